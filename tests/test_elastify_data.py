"""elastify on the token store: packed steps against each document alone, the rows and budgets of a
step against their definitions, resume against the uninterrupted run under every budget sampling,
and the data paths (a prepare-data store, a jsonl file, the synthetic set) from the command line.
Two processes against one (FSDP2, budget_sampling micro_batch) and kill -9: test_distributed.py."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from test_elastify import config, save_tiny_parent
from test_packed import GRAD_RTOL, SUM_RTOL, assert_grads_close

from star_elastic.cli import main
from star_elastic.config import ConfigError
from star_elastic.data.packing import Rows
from star_elastic.data.sampler import PackedSampler
from star_elastic.distributed import EngineConfig, parallelize
from star_elastic.elastic.run import load_elastic
from star_elastic.train.distill import DistillStep
from star_elastic.train.elastify import accumulate, kd_positions, prepare, state_digest, step_budgets, train

quiet = lambda msg: None  # noqa: E731


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    return save_tiny_parent(tmp_path_factory.mktemp("parent"))


def rows_alone(rows: Rows) -> Rows:
    """Every document piece of packed `rows` in a row of its own, padded at the end (with seq_idx 0
    throughout: one document, the unpacked path; causal, so the padding after it changes nothing)."""
    keys = ("ids", "mask", "seq_idx", "real")
    out = {k: [] for k in keys}
    for r in range(rows.ids.shape[0]):
        for k in rows.seq_idx[r][rows.real[r].bool()].unique().tolist():
            at = (rows.seq_idx[r] == k).nonzero()[:, 0]
            for key in keys:
                row = torch.zeros(rows.ids.shape[1], dtype=torch.long)
                row[: len(at)] = getattr(rows, key)[r, at] if key != "seq_idx" else 0
                out[key].append(row)
    return Rows(*(torch.stack(out[k]) for k in keys))


def test_a_packed_step_equals_its_documents_each_in_a_row(parent_dir, tmp_path):
    """One elastify step (budget_sampling all: every budget, KD + LM, router loss) over packed rows,
    and over the same document pieces one per row: the same KL and CE sums per budget and loss-token
    counts, and the same gradients. The loss tokens are the packing's mask (no piece's first token)."""
    cfg = config(parent_dir, tmp_path / "run", budget_sampling="all", lm_weight=0.5, n_synthetic=60,
                 elastic={"budgets": [1.0, 0.6]})
    elastic, parent, store = prepare(cfg, log=quiet)
    engine = parallelize(DistillStep(elastic, chunk_tokens=16), parent, "none", 0, 1, EngineConfig())
    packed = PackedSampler(store, 128, seed=5, pad_id=0).next_rows(3)
    assert (packed.seq_idx.amax(1) >= 2).all()  # several documents in every row
    kd = kd_positions(packed.mask).nonzero()  # KD where the next token is a loss token of the same document
    assert len(kd) == int(packed.mask.sum()) and (packed.mask[kd[:, 0], kd[:, 1] + 1] == 1).all()
    assert (packed.seq_idx[kd[:, 0], kd[:, 1]] == packed.seq_idx[kd[:, 0], kd[:, 1] + 1]).all()
    alone = rows_alone(packed)
    assert int(alone.mask.sum()) == int(packed.mask.sum()) and (alone.mask[:, 0] == 0).all()

    def step(rows):
        elastic.zero_grad(set_to_none=True)
        result = accumulate(cfg, engine, elastic, 0, 2, 20.0, rows, rows.mask.sum().float(), 0, 1)
        return result.sums, {n: p.grad.clone() for n, p in elastic.named_parameters() if p.grad is not None}

    (sums_packed, g_packed), (sums_alone, g_alone) = step(packed), step(alone)
    assert sums_packed[1, 0] > 1e-2 and (sums_packed[:, 1] > 1).all()  # KL at 0.6 (at 1.0 the student is the teacher)
    torch.testing.assert_close(sums_packed, sums_alone, atol=1e-5, rtol=SUM_RTOL)
    assert any(k.startswith("router.") for k in g_packed)
    assert assert_grads_close(g_packed, g_alone)[0] <= GRAD_RTOL


def test_micro_batches_keep_their_global_index_over_processes():
    """The global batch cut into micro-batches of 2 rows: process r of W holds global micro-batches
    r·R/2 ... in row order, so the union over processes is the one-process cut, rows disjoint."""
    from star_elastic.data.loading import split_rows

    rows = Rows(*(torch.arange(8 * 3).reshape(8, 3) + 100 * i for i in range(4)))
    whole = dict(split_rows(rows, 2))
    for world in (2, 4):
        got = {}
        for r in range(world):
            share = Rows(*(t[r * 8 // world : (r + 1) * 8 // world] for t in (rows.ids, rows.mask, rows.seq_idx,
                                                                                rows.real)))
            for g, part in split_rows(share, 2, r):
                assert g not in got
                got[g] = part
        assert got.keys() == whole.keys() == set(range(4))
        for g in got:
            assert torch.equal(got[g].ids, whole[g].ids) and torch.equal(got[g].seq_idx, whole[g].seq_idx)
    with pytest.raises(ConfigError, match="micro_batch_size 3 must divide the 8 rows"):
        split_rows(rows, 3)


@pytest.mark.parametrize("stage, probs", [(1, (1 / 3, 1 / 3, 1 / 3)), (2, (0.2, 0.3, 0.5))])
def test_budgets_drawn_per_micro_batch_follow_the_stage_probabilities(parent_dir, tmp_path, stage, probs):
    """20,000 draws (2,500 steps of 8 micro-batches): each budget's share within 5 standard errors of
    its probability; two micro-batches of a step agree as often as independent draws do (Σ p²)."""
    cfg = config(parent_dir, tmp_path, budget_sampling="micro_batch", engine={"micro_batch_size": 1},
                 stage2_probs=(0.2, 0.3, 0.5))
    budgets = (1.0, 0.75, 0.5)
    draws = [step_budgets(cfg, budgets, step, stage, 8) for step in range(2500)]
    counts = Counter(b for step in draws for (b,) in step)
    total = sum(counts.values())
    for b, p in zip(budgets, probs):
        assert abs(counts[b] / total - p) <= 5 * math.sqrt(p * (1 - p) / total), (b, counts)
    same = sum(step[0] == step[1] for step in draws) / len(draws)
    agree = sum(p * p for p in probs)
    assert abs(same - agree) <= 5 * math.sqrt(agree * (1 - agree) / len(draws))
    assert step_budgets(cfg, budgets, 7, stage, 8) == step_budgets(cfg, budgets, 7, stage, 8)  # a pure function
    one = config(parent_dir, tmp_path, stage2_probs=(0.2, 0.3, 0.5))  # step: one draw for all micro-batches
    assert all(len(set(step_budgets(one, budgets, s, stage, 4))) == 1 for s in range(50))
    assert step_budgets(config(parent_dir, tmp_path, budget_sampling="all"), budgets, 3, stage, 2) == [budgets] * 2


def test_all_trains_every_budget_once_per_micro_batch_and_its_router_loss_once(parent_dir, tmp_path, monkeypatch):
    """budget_sampling all, 4 rows in 2 micro-batches: per step the teacher runs twice, the student
    6 times (each budget once per micro-batch), the router loss 3 times (once per budget); the
    logged kd is the sum of the budgets' (every budget saw every loss token)."""
    import star_elastic.train.elastify as recipe

    calls = {"student": [], "router": []}
    forward, router_loss = DistillStep.forward, recipe.router_loss_parts

    def student(self, ids, budget, *args, **kwargs):
        calls["student"].append((len(calls["router"]), budget))
        return forward(self, ids, budget, *args, **kwargs)

    def router(cost, picks, budget):
        calls["router"].append(budget)
        return router_loss(cost, picks, budget)

    monkeypatch.setattr(DistillStep, "forward", student)
    monkeypatch.setattr(recipe, "router_loss_parts", router)
    run = tmp_path / "run"
    train(config(parent_dir, run, steps=2, budget_sampling="all", engine={"micro_batch_size": 2}), log=quiet)
    budgets = [1.0, 0.75, 0.5]
    assert [b for _, b in calls["student"]] == budgets * 4  # 2 steps x 2 micro-batches, every budget in order
    assert calls["router"] == budgets * 2  # once per budget and step, at the last micro-batch
    assert [n for n, _ in calls["student"]] == [0, 0, 0, 0, 1, 2, 3, 3, 3, 3, 4, 5]
    for record in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        assert record["budgets"] == budgets and "budget" not in record
        assert record["kd"] == pytest.approx(sum(record["kd_by_budget"].values()), rel=1e-9)


def test_micro_batch_sampling_trains_the_logged_draws(parent_dir, tmp_path, monkeypatch):
    """budget_sampling micro_batch, 4 rows in 4 micro-batches: the student runs at each micro-batch's
    drawn budget (`step_budgets`), the metrics log them; micro_batch_size is required."""
    calls = []
    forward = DistillStep.forward

    def student(self, ids, budget, *args, **kwargs):
        calls.append(budget)
        return forward(self, ids, budget, *args, **kwargs)

    monkeypatch.setattr(DistillStep, "forward", student)
    run = tmp_path / "run"
    cfg = config(parent_dir, run, steps=4, budget_sampling="micro_batch", engine={"micro_batch_size": 1})
    train(cfg, log=quiet)
    drawn = [b for s in range(4) for (b,) in step_budgets(cfg, (1.0, 0.75, 0.5), s, 1 if s < 2 else 2, 4)]
    assert calls == drawn and len(set(drawn)) > 1
    logged = [json.loads(line)["budgets"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [b for step in logged for b in step] == drawn
    with pytest.raises(ConfigError, match="budget_sampling micro_batch draws a budget per micro-batch"):
        config(parent_dir, run, budget_sampling="micro_batch")


@pytest.mark.parametrize("sampling", ["micro_batch", "all"])
def test_resume_equals_uninterrupted_under_each_budget_sampling(parent_dir, tmp_path, sampling):
    """Stopped after step 4 (the stage-2 rows part taken), resumed: the same weights as
    the uninterrupted run, bit for bit. A resume with another micro_batch_size is refused under
    micro_batch (it decides the draws)."""
    base = dict(budget_sampling=sampling, engine={"micro_batch_size": 2})
    whole = train(config(parent_dir, tmp_path / "a", **base), log=quiet)
    train(config(parent_dir, tmp_path / "b", stop_after=4, **base), log=quiet)
    if sampling == "micro_batch":
        with pytest.raises(ConfigError, match="resume: engine.micro_batch_size changed .* 2 → 1"):
            train(config(parent_dir, tmp_path / "b", resume=True, **(base | {"engine": {"micro_batch_size": 1}})),
                  log=quiet)
    state = tmp_path / "b" / "checkpoints" / "step-000004" / "state.json"
    saved = json.loads(state.read_text())
    assert saved["data"]["2"]["rows"] == 4 and saved["data"]["1"]["rows"] == 12  # rows taken per stage
    state.write_text(json.dumps({k: v for k, v in saved.items() if k != "data"}))  # an older checkpoint
    with pytest.raises(ConfigError, match="step-000004: holds no data position"):
        train(config(parent_dir, tmp_path / "b", resume=True, **base), log=quiet)
    state.write_text(json.dumps(saved))
    resumed = train(config(parent_dir, tmp_path / "b", resume=True, **base), log=quiet)
    assert resumed["state_sha256"] == whole["state_sha256"]
    assert state_digest(load_elastic(tmp_path / "a")) == state_digest(load_elastic(tmp_path / "b"))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_cli_prepare_data_mixture_then_elastify_on_the_store_and_on_files(parent_dir, tmp_path, capsys):
    """prepare-data of a two-source mixture (text and chat records), then elastify --data STORE (read
    in place, nothing prepared in RUN); a jsonl --data is prepared into RUN/data with a note; a store
    for a larger vocabulary than the parent's is refused in one line."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"{i} + {i} = {2 * i}"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": f"{i}?"},
                                                         {"role": "assistant", "content": f"{i}!"}]}
                                           for i in range(30)])
    store = tmp_path / "store"
    assert main(["prepare-data", f"{a}:0.7", f"{b}:0.3", "--tokenizer", str(parent_dir), "--out", str(store)]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert [s["weight"] for s in manifest["sources"]] == pytest.approx([0.7, 0.3])
    flags = ["--model", str(parent_dir), "--budgets", "1.0,0.5", "--steps", "2", "--stage1-seq-len", "16",
             "--stage2-seq-len", "24", "--batch-size", "2", "--calibration-batches", "1", "--router-fit-steps", "10"]
    assert main(["elastify", *flags, "--data", str(store), "--out", str(tmp_path / "run")]) == 0
    assert not (tmp_path / "run" / "data").exists() and load_elastic(tmp_path / "run").ecfg.budgets == (1.0, 0.5)
    capsys.readouterr()
    assert main(["elastify", *flags, "--data", a, "--out", str(tmp_path / "run2")]) == 0
    assert f"note: preparing {a} into a token store at {tmp_path / 'run2' / 'data'}" in capsys.readouterr().err
    assert (tmp_path / "run2" / "data" / "manifest.json").is_file()
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3]}])
    assert main(["prepare-data", ids, "--vocab-size", "100000", "--out", str(tmp_path / "wide")]) == 0
    assert main(["elastify", *flags, "--data", str(tmp_path / "wide"), "--out", str(tmp_path / "run3")]) == 2
    err = capsys.readouterr().err
    assert "prepared for a vocabulary of 100000 ids" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["nemotron-3-nano-30b.yaml", "nemotron-nano-9b-v2.yaml"])
def test_real_recipe_headers_prepare_a_mixture_and_train_on_that_store(name, monkeypatch):
    """The header's commands parse as written (from the repository root): prepare-data of a weighted
    two-source mixture with the parent's tokenizer, then elastify with --data that store."""
    import shlex
    from pathlib import Path

    from star_elastic.cli import COMMANDS, build_parser, load_config

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    commands, current = [], ""
    for line in (root / "configs" / name).read_text().splitlines():
        if line.startswith("#"):
            current += " " + line[1:].strip().removesuffix("\\")
            if not line.endswith("\\"):
                commands, current = commands + [current], ""
    configs = {}
    for text in (c for c in commands if "star-elastic prepare-data" in c or "star_elastic.cli elastify" in c):
        words = shlex.split(text.split("star-elastic ", 1)[-1].split("star_elastic.cli ", 1)[-1])
        cmd = next(c for c in COMMANDS if c.name == words[0])
        configs[cmd.name] = load_config(cmd, build_parser(only=cmd.name).parse_args(words))
    prep, run = configs["prepare-data"], configs["elastify"]
    assert [spec.rsplit(":", 1)[1] for spec in prep.inputs] == ["0.7", "0.3"]
    assert run.data == prep.out and prep.tokenizer == run.model
