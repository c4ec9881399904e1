"""Hostile input gets OpenAI-shaped 4xx errors, never a 5xx, and the server keeps serving."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import signal
import threading
import time

import httpx
import pytest
import torch
from server_helpers import (CONTEXT, NAME, FailingServer, SlowServer, reference, scheduler_of, serve,
                            tiny_budget_server)

from star_elastic.data.tokenizer import format_prompt
from star_elastic.infer import generate as generate_module
from star_elastic.infer.budget import Job
from star_elastic.infer.generate import GenerationConfig
from star_elastic.serve.scheduler import Scheduler
from star_elastic.serve.schemas import TEXT_PATTERN

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
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, 400,
     "messages.0.content.0.text"),
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
    ({"stop": [""]}, 400, "stop.0"),
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


def test_fuzz_findings_stay_fixed(live):
    """Found by scripts/fuzz_server.py (schemathesis): a 500 and a request the schema forbids, accepted."""
    url = live.url + "/v1/completions"
    body = {"model": f"{NAME}@0.5", "prompt": "cv", "max_tokens": 6, "temperature": 1.0, "seed": 1}
    greedy = post_json(url, body | {"temperature": 0}).json()["choices"][0]["text"]
    r = post_json(url, body | {"top_p": 1.1696699945933687e-66})  # 0 in float32: nothing was kept, a 500
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy  # the top token only
    r = post_json(url, {"model": f"{NAME}@1", "prompt": [0], "answer_budget": 1.0000000000000002})
    assert_openai_error(r, 400, "answer_budget")  # the schema's enum lists 1.0; it was within 1e-9
    r = post_json(url, body | {"prompt": "cv\ud97a\udcc8\u00d2"})  # a surrogate pair is one character: fine
    assert r.status_code == 200, r.text


def test_openapi_schema_documents_this_server(live):
    """/openapi.json: the four routes, validation errors as 400 (no 422), the served ids and budgets
    as enums, the token caps bounded by the context, and text fields' pattern."""
    schema = httpx.get(live.url + "/openapi.json").json()
    assert set(schema["paths"]) == {"/v1/models", "/health", "/v1/completions", "/v1/chat/completions"}
    for path in schema["paths"].values():
        for op in path.values():
            assert "422" not in op["responses"]
    assert {"200", "400", "404", "500", "503"} <= set(schema["paths"]["/v1/completions"]["post"]["responses"])
    budgets = sorted(tiny_budget_server().elastic.ecfg.budgets, reverse=True)
    for name in ("CompletionRequest", "ChatRequest"):
        props = schema["components"]["schemas"][name]["properties"]
        assert props["model"]["enum"] == [NAME] + [f"{NAME}@{b:g}" for b in budgets]
        assert props["think_budget"]["anyOf"][0]["enum"] == budgets
        assert props["max_tokens"]["anyOf"][0]["maximum"] == CONTEXT
        assert props["user"]["anyOf"][0]["pattern"] == TEXT_PATTERN
    vocab = tiny_budget_server().parent.config.vocab_size
    prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[2]["items"] == {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    assert prompt[3]["items"]["items"] == prompt[2]["items"]


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
    from star_elastic.serve.app import ServeConfig, make_local_app, make_proxy_app

    yaml_path = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
    cfg = from_dict(ServeConfig, merge_config(yaml_path, {"port": 9001, "api_key": None, "phases.max_think_tokens": 7}))
    assert (cfg.port, cfg.phases.think, cfg.phases.answer, cfg.host) == (9001, 0.5, 1.0, "127.0.0.1")
    assert (cfg.phases.max_think_tokens, cfg.phases.max_answer_tokens) == (7, 64)  # a flag over the file's 96
    with pytest.raises(ConfigError, match="--answer 0.3 is not a trained budget"):
        make_local_app(tiny_budget_server(), ServeConfig(phases={"answer": 0.3}))
    with pytest.raises(ConfigError, match="a proxy's budgets are fixed by --think-backend/--answer-backend"):
        make_proxy_app("http://127.0.0.1:1", "http://127.0.0.1:1", None, ServeConfig(phases={"think": 0.5}))
    assert main(["serve"]) == 2
    assert main(["serve", str(tmp_path)]) == 2
    assert main(["serve", str(tmp_path), "--think-backend", "http://127.0.0.1:1"]) == 2
    assert main(["serve", str(tmp_path), "--max-batch", "0"]) == 2
    assert main(["serve", str(tmp_path), "--threads", "0"]) == 2
    assert main(["serve", str(tmp_path), "--max-answer-tokens", "0"]) == 2
    assert main(["serve", str(tmp_path), "--device", "cuda"]) == 2  # without CUDA: refused before the run is read
    err = capsys.readouterr().err
    if not torch.cuda.is_available():
        assert "device 'cuda': CUDA is not available" in err
    assert "give an elastic run folder" in err and "no run.json" in err and "needs --think-backend, --answer-backend" in err
    assert "max_batch >= 1" in err and "--threads must be >= 1, got 0" in err and "Traceback" not in err
    assert "max_answer_tokens >= 1" in err


def test_an_untrained_budget_is_refused_alike_by_generate_serve_and_a_request(live, tmp_path, capsys):
    """One resolver: `generate --think 0.6`, `serve --think 0.6` and a request's
    `think_budget: 0.6` are refused with the same words, the request's naming its own field."""
    from star_elastic.cli import main
    from star_elastic.elastic.run import save_run

    elastic = tiny_budget_server().elastic
    save_run(elastic, tmp_path / "run")
    want = f"--think 0.6 is not a trained budget; choose one of {', '.join(f'{b:g}' for b in elastic.ecfg.budgets)}"
    for argv in (["generate", str(tmp_path / "run"), "1+1=?", "--think", "0.6"],
                 ["serve", str(tmp_path / "run"), "--think", "0.6"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"star-elastic {argv[0]}: error: {want}"
    r = post_json(live.url + "/v1/chat/completions", GOOD | {"think_budget": 0.6})
    assert_openai_error(r, 400, "think_budget")
    assert r.json()["error"]["message"] == want.replace("--think", "think_budget")


# --- a failure ends its own request only --------------------------------------------------------
class Collect:
    """A job's `emit`: its events, and a flag once the last one ("done" or "error") arrived."""

    def __init__(self):
        self.events: list = []
        self.ended = threading.Event()

    def __call__(self, events: list) -> None:
        self.events += events
        if any(kind in ("done", "error") for kind, _ in events):
            self.ended.set()


JOBS = [  # (user message, think budget or None, answer budget, think cap, answer cap, temperature, seed)
    ("1+2=?", 0.5, 1.0, 6, 5, 0.0, None),  # the answer re-prefilled by another budget
    ("abc", 0.75, 0.75, 6, 5, 1.0, 11),  # the answer continues the trace's cache in place
    ("x", None, 0.5, 0, 6, 1.0, 12),  # one phase
    ("9", 1.0, 1.0, 3, 4, 0.0, None),
]


def job(server, case, request_id: str, logprobs: int | None = 2) -> Job:
    msg, think, answer, cap, n, temperature, seed = case
    tok = server.parent.tokenizer
    prompt = tok.encode(format_prompt(tok, msg), add_special_tokens=False)
    sampling = GenerationConfig(temperature=temperature, seed=seed, logprobs=logprobs)
    return Job(prompt, answer, n, sampling, Collect(), think_budget=think, max_think_tokens=cap, echo=True,
               request_id=request_id)


def run_together(sched: Scheduler, jobs: list[Job]) -> list[list]:
    """Submit under the scheduler's lock, so that its worker admits every job in one step: they share batches."""
    with sched._lock:
        for j in jobs:
            sched.submit(j)
    for j in jobs:
        assert j.emit.ended.wait(120), "a job never ended"
    return [j.emit.events for j in jobs]


def assert_same_events(got: list[list], want: list[list]) -> None:
    """Equal events, log-probabilities to 1e-5 (a batch of other rows and padding moves them by float rounding)."""
    def flat(events):
        out = []
        for kind, value in events:
            scores = value if kind == "prompt_logprobs" else [value] if kind == "logprob" else None
            if scores is None:
                out.append((kind, value))
                continue
            for s in scores:
                out.append((kind, None) if s is None else (kind, [t for t, _ in s.top]))
                out += [pytest.approx(v, abs=1e-5) for v in ([s.logprob] + [v for _, v in s.top])] if s else []
        return out

    assert [flat(e) for e in got] == [flat(e) for e in want]


def alone(server, cases) -> list[list]:
    sched = Scheduler(server)
    try:
        return run_together(sched, [job(server, c, f"ref-{i}") for i, c in enumerate(cases)])
    finally:
        sched.close()


def fail_sampling_of_seed(seed: int, monkeypatch) -> None:
    real = generate_module.sample_next

    def sample_next(logits, cfg, generator):
        if generator is not None and generator.initial_seed() == seed:
            raise RuntimeError("injected sampling failure")
        return real(logits, cfg, generator)

    monkeypatch.setattr(generate_module, "sample_next", sample_next)


def fail_answer_row_of(server, message: str, monkeypatch) -> None:
    tok = server.parent.tokenizer
    marked = tok.encode(format_prompt(tok, message), add_special_tokens=False)
    real = server.answer_row

    def answer_row(think, *args, **kwargs):
        if think.prompt[: len(marked)] == marked:
            raise ValueError("injected answer-phase failure")
        return real(think, *args, **kwargs)

    monkeypatch.setattr(server, "answer_row", answer_row)


@pytest.mark.parametrize("where,bad", [
    ("seed", ("7*7=?", 0.5, 1.0, 4, 4, 1.0, 2**64)),  # once killed the scheduler's thread (2**64 overflows torch)
    ("sampling", ("7*7=?", 0.75, 0.75, 6, 4, 1.0, 666)),  # inside a decode step of a batch with other rows
    ("answer", ("7*7=?", 0.5, 1.0, 3, 4, 0.0, None)),  # building the answer phase, between steps
    ("answer", ("7*7=?", 0.75, 0.75, 3, 4, 0.0, None)),  # in place: inside the step's continuation
])
def test_one_failing_job_leaves_the_batch_and_its_neighbours_outputs_alone(where, bad, monkeypatch, caplog):
    """In-process scheduler: the failing job gets an error event naming its request id (and is logged);
    the jobs batched with it get exactly the events (tokens, log-probabilities, prompt scores, finish)
    they get without it; the scheduler then serves the next jobs."""
    server = tiny_budget_server()
    want = alone(server, JOBS)
    if where == "sampling":
        fail_sampling_of_seed(666, monkeypatch)
    elif where == "answer":
        fail_answer_row_of(server, bad[0], monkeypatch)
    sched = Scheduler(server)
    try:
        jobs = [job(server, c, f"good-{i}") for i, c in enumerate(JOBS)]
        with caplog.at_level(logging.ERROR, logger="star_elastic.serve"):
            *got, failed = run_together(sched, jobs + [job(server, bad, "bad-1")])
        assert sched.peak_rows > len(JOBS) // 2  # they really shared batches
        assert_same_events(got, want)
        kind, message = failed[-1]
        assert kind == "error" and "request bad-1" in message
        assert [r.message for r in caplog.records] == ["request bad-1 failed"]
        assert_same_events(run_together(sched, [job(server, c, f"after-{i}") for i, c in enumerate(JOBS)]), want)
        assert sched.active_jobs() == 0
    finally:
        sched.close()


def test_a_failed_forward_fails_its_batch_only_and_the_next_jobs_are_served(monkeypatch):
    """A decode forward of the 0.75 batch raises once: its jobs fail; the other budgets' jobs finish as
    without the failure; a later 0.75 job is served by a new batch."""
    server = tiny_budget_server()
    cases = [("x", None, 0.75, 0, 6, 0.0, None), ("abc", None, 0.5, 0, 6, 1.0, 5), ("1+2=?", 0.5, 1.0, 4, 4, 0.0, None)]
    want = alone(server, cases)
    view, calls = server.model(0.75), []
    real = view.forward

    def forward(ids, *args, **kwargs):
        calls.append(ids.shape)
        if ids.shape[1] == 1 and len(calls) == 3:  # the prefill, one decode step, then this one
            raise RuntimeError("injected forward failure")
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(view, "forward", forward)
    sched = Scheduler(server)
    try:
        failed, *got = run_together(sched, [job(server, c, f"j{i}") for i, c in enumerate(cases)])
        assert failed[-1][0] == "error" and "injected forward failure" in failed[-1][1]
        assert_same_events(got, want[1:])
        assert_same_events(run_together(sched, [job(server, cases[0], "again")]), want[:1])
    finally:
        sched.close()


@pytest.fixture(scope="module")
def failing():
    with serve(FailingServer.from_elastic(tiny_budget_server().elastic), max_batch=8) as bg:
        yield bg


def test_a_request_failing_in_the_engine_gets_a_500_and_the_others_their_answers(failing):
    """Through the engine process: the failing request's 500 names its id; requests batched with it get
    the answers of in-process budget control; the server stays healthy."""
    server = tiny_budget_server()
    cases = [("1+2=?", 0.5, 1.0, 6, 5), ("abc", 0.75, 0.75, 4, 5), ("x", 1.0, 0.5, 6, 3)]

    def body(msg, tb, ab, cap, n):
        return {"model": NAME, "messages": [{"role": "user", "content": msg}], "temperature": 0, "max_tokens": n,
                "think_budget": tb, "answer_budget": ab, "max_think_tokens": cap, "skip_special_tokens": False}

    async def together():
        async with httpx.AsyncClient(base_url=failing.url, timeout=120) as h:
            bad = body(FailingServer.FAIL_ANSWER, 0.5, 1.0, 4, 4)
            return await asyncio.gather(*(h.post("/v1/chat/completions", json=b)
                                          for b in [bad] + [body(*c) for c in cases]))

    bad, *good = asyncio.run(together())
    assert_openai_error(bad, 500)
    err = bad.json()["error"]
    assert err["code"] == "generation_failed" and "injected failure" in err["message"]
    assert "request chatcmpl-" in err["message"]
    for case, r in zip(cases, good):
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == reference(server, case)[:2]
    assert httpx.get(failing.url + "/health").json() == {"status": "ok"}


def test_engine_death_answers_waiting_requests_and_health_with_503():
    """The engine process dies (killed, or its scheduler thread ends): a request waiting for its answer
    gets a 503 naming the cause, not a hang; /health says 503 too."""
    elastic = tiny_budget_server().elastic
    for cause, server in (("kill", SlowServer.from_elastic(elastic)), ("thread", FailingServer.from_elastic(elastic))):
        with serve(server) as bg:
            engine = scheduler_of(bg)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                msg = FailingServer.END_SCHEDULER if cause == "thread" else "1+2=?"
                body = {"model": NAME, "messages": [{"role": "user", "content": msg}], "max_tokens": 140,
                        "max_think_tokens": 8, "temperature": 0}
                waiting = pool.submit(httpx.post, bg.url + "/v1/chat/completions", json=body, timeout=120)
                if cause == "kill":
                    deadline = time.monotonic() + 60
                    while engine.active_jobs() == 0 and time.monotonic() < deadline:
                        time.sleep(0.02)
                    os.kill(engine.pid, signal.SIGKILL)
                r = waiting.result()
            code = "-9" if cause == "kill" else "70"
            assert_openai_error(r, 503)
            assert r.json()["error"]["code"] == "engine_unavailable" and f"exit code {code}" in r.text
            health = httpx.get(bg.url + "/health")
            assert health.status_code == 503 and f"exit code {code}" in health.json()["error"]["message"]
