"""lm-eval-harness as a real client: its generations through the server == in-process budget control."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_helpers import NAME, reference, serve, tiny_budget_server

pytest.importorskip("tenacity")  # lm_eval's API models need the lm_eval[api] extra
lm_eval = pytest.importorskip("lm_eval")

TASK_DIR = Path(__file__).resolve().parents[1] / "interop" / "lm_eval" / "star_elastic_serve_budget"
TASK = "star_elastic_serve_budget"


def test_lm_eval_chat_client_scores_the_servers_answers(tmp_path):
    from lm_eval.tasks import TaskManager

    yaml = (TASK_DIR / f"{TASK}.yaml").read_text()
    (tmp_path / f"{TASK}.yaml").write_text(yaml.replace(f"interop/lm_eval/{TASK}/test.jsonl",
                                                        str(TASK_DIR / "test.jsonl")))
    server = tiny_budget_server()
    with serve(server) as bg:
        out = lm_eval.simple_evaluate(
            model="local-chat-completions",
            model_args={"base_url": bg.url + "/v1/chat/completions", "model": NAME, "num_concurrent": 4,
                        "max_retries": 1},
            tasks=[TASK], apply_chat_template=True, log_samples=True, limit=5,
            gen_kwargs="think_budget=0.5,answer_budget=1.0,max_think_tokens=6,skip_special_tokens=False",
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),  # skip indexing ~10k tasks
        )
    samples = out["samples"][TASK]
    docs = [json.loads(line) for line in (TASK_DIR / "test.jsonl").read_text().splitlines()][:5]
    assert len(samples) == 5
    hits = []
    for s in samples:
        doc = docs[s["doc_id"]]
        _, answer, _, _ = reference(server, (doc["prompt"], 0.5, 1.0, 6, 8))
        assert s["resps"][0][0] == answer
        hits.append(answer == doc["answer"])
    assert out["results"][TASK]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
