"""Hostile input gets OpenAI-shaped 4xx errors, never a 5xx, and the server keeps serving."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from server_helpers import CONTEXT, NAME, serve, tiny_budget_server

GOOD = {"model": NAME, "messages": [{"role": "user", "content": "1+1=?"}], "max_tokens": 2, "temperature": 0,
        "max_think_tokens": 2}
BAD = [  # (body changes, status, param named in the error)
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, None),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": "hi"}, 400, "messages"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -3}, 400, "max_tokens"),
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"temperature": 9}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"n": 0}, 400, "n"),
    ({"n": 17}, 400, "n"),
    ({"n": 2, "stream": True}, 400, "n"),
    ({"seed": 2**64}, 400, "seed"),  # once a ValueError in the scheduler's thread: every later request hung
    ({"seed": 2**63}, 400, "seed"),
    ({"seed": -1}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages.0.content"),  # once a 500 TypeError
    ({"messages": [{"role": "user", "content": "1+\x00"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, 400, "messages.0.content.0.text"),
    ({"stop": ["\ud800"]}, 400, "stop.0"),
    ({"user": "\x00"}, 400, "user"),
    ({"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},  # the template refuses
                   {"role": "user", "content": "1"}]}, 400, "messages"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"logprobs": True, "stream": True}, 400, "logprobs"),
    ({"frobnicate": True}, 400, "frobnicate"),
    ({"think_budget": 0.3}, 400, "think_budget"),
    ({"answer_budget": 2.0}, 400, "answer_budget"),
    ({"think_budget": "0.5"}, 400, "think_budget"),
    ({"max_think_tokens": -1}, 400, "max_think_tokens"),
    ({"max_think_tokens": 3, "thinking_token_budget": 4}, 400, None),
    ({"stop": [""]}, 400, None),
    ({"messages": [{"role": "user", "content": "1" * (CONTEXT + 1)}]}, 400, "prompt"),
    ({"max_tokens": CONTEXT * 4}, 400, "prompt"),
    ({"model": "gpt-4"}, 404, "model"),
    ({"model": None}, 400, "model"),
]


@pytest.fixture(scope="module")
def live():
    with serve(tiny_budget_server(), max_batch=8) as bg:
        yield bg


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize("change,status,param", BAD, ids=[str(c)[:40] for c, _, _ in BAD])
def test_bad_requests_get_openai_errors(live, change, status, param):
    r = post_json(live.url + "/v1/chat/completions", GOOD | change)
    assert_openai_error(r, status, param)


def post_json(url: str, body: dict) -> httpx.Response:
    """JSON with \\u escapes (json.dumps' default): lone surrogates travel as valid JSON."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)


def test_malformed_bodies(live):
    url = live.url + "/v1/chat/completions"
    for raw in (b"{", b"[1, 2]", b"null", b"\xff\xfe", b'{"model": "tiny", "messages": [}', b""):
        assert_openai_error(httpx.post(url, content=raw, headers={"content-type": "application/json"}), 400)
    assert_openai_error(httpx.post(live.url + "/v1/completions", json={"model": NAME, "prompt": [10**9]}), 400, "prompt")
    assert_openai_error(httpx.get(live.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(url), 405)


def hostile(rng: random.Random) -> bytes:
    """A random mutation of a good body: wrong types, unknown keys, huge numbers, junk bytes."""
    body = json.loads(json.dumps(GOOD))
    junk = [None, -1, 0, 10**12, 1e308, "x" * rng.randint(0, 300), [], {}, True, [1, "a"], "ü\u0000", -0.0, 0.5]
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(body) + ["think_budget", "answer_budget", "stop", "seed", "top_p", "n", "stream",
                                       "thinking_token_budget", "bogus", "messages"])
        body[key] = rng.choice(junk)
    raw = json.dumps(body).encode()
    if rng.random() < 0.2:  # truncated or corrupted JSON
        cut = rng.randint(0, len(raw))
        raw = raw[:cut] + bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 4)))
    return raw


def test_fuzz_hundreds_of_hostile_requests_never_5xx(live):
    rng = random.Random(0)
    statuses = []
    with httpx.Client(base_url=live.url, timeout=30) as h:
        for _ in range(300):
            path = rng.choice(["/v1/chat/completions", "/v1/completions"])
            r = h.post(path, content=hostile(rng), headers={"content-type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code < 500, r.text
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        ok = h.post("/v1/chat/completions", json=GOOD)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
    assert sum(s >= 400 for s in statuses) > 250  # the fuzz was hostile


def test_serve_config_yaml_flags_and_cli_errors(tmp_path, capsys):
    from pathlib import Path

    from star_elastic.cli import main
    from star_elastic.config import ConfigError, from_dict, merge_config
    from star_elastic.serve.app import ServeConfig, make_local_app

    yaml_path = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
    cfg = from_dict(ServeConfig, merge_config(yaml_path, {"port": 9001, "api_key": None}))
    assert (cfg.port, cfg.think_budget, cfg.answer_budget, cfg.host) == (9001, 0.5, 1.0, "127.0.0.1")
    with pytest.raises(ConfigError, match="--think-budget 0.3 is not a trained budget"):
        make_local_app(tiny_budget_server(), ServeConfig(think_budget=0.3))
    assert main(["serve"]) == 2
    assert main(["serve", str(tmp_path)]) == 2
    assert main(["serve", str(tmp_path), "--think-backend", "http://127.0.0.1:1"]) == 2
    assert main(["serve", str(tmp_path), "--max-batch", "0"]) == 2
    assert main(["serve", str(tmp_path), "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "give an elastic run folder" in err and "no run.json" in err and "needs --think-backend, --answer-backend" in err
    assert "max_batch >= 1" in err and "--threads must be >= 1, got 0" in err and "Traceback" not in err
