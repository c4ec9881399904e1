"""The HTTP server against in-process budget control: outputs, batching, streaming, the proxy.

Every request here goes through the official `openai` client; references are `ElasticServer.generate`
and `generate()` run in-process on the same weights.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest
from server_helpers import NAME, SlowServer, reference, scheduler_of, serve, tiny_budget_server

from star_elastic.infer.generate import GenerationConfig, generate
from star_elastic.serve.app import BackgroundServer, ServeConfig, make_local_app, make_proxy_app

RAW = {"skip_special_tokens": False}  # exact text: every token id decodes to text and back
CASES = [  # (user message, think budget, answer budget, think cap, answer cap)
    ("1+2=?", 0.5, 1.0, 10, 6), ("abc", 1.0, 0.5, 4, 5), ("12*3=?", 0.75, 0.75, 0, 4), ("x", 0.5, 0.5, 12, 3),
    ("what is 7-5?", 1.0, 1.0, 7, 7), ("9", 0.75, 0.5, 3, 8),
]


@pytest.fixture(scope="module")
def budget_server():
    return tiny_budget_server()


@pytest.fixture(scope="module")
def live(budget_server):
    with serve(budget_server, max_batch=32) as bg:
        yield bg


def client(bg, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=bg.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def chat_kwargs(case, **extra):
    msg, tb, ab, cap, n = case
    body = {"think_budget": tb, "answer_budget": ab, "max_think_tokens": cap} | RAW
    return dict(model=NAME, messages=[{"role": "user", "content": msg}], temperature=0, max_tokens=n,
                extra_body=body, **extra)


def test_models_lists_the_elastic_model_and_every_budget(live, budget_server):
    ids = [m.id for m in client(live).models.list().data]
    assert ids == [NAME] + [f"{NAME}@{b:g}" for b in sorted(budget_server.elastic.ecfg.budgets, reverse=True)]


def test_chat_equals_in_process_budget_control_for_mixed_budgets(live, budget_server):
    c = client(live)
    for i, case in enumerate(CASES):
        kw = chat_kwargs(case)
        if i % 2:  # vLLM's name for the cap
            kw["extra_body"]["thinking_token_budget"] = kw["extra_body"].pop("max_think_tokens")
        r = c.chat.completions.create(**kw)
        reasoning, answer, n_think, n_total = reference(budget_server, case)
        assert r.choices[0].message.reasoning_content == reasoning
        assert r.choices[0].message.content == answer
        assert r.usage.completion_tokens_details.reasoning_tokens == n_think
        assert r.usage.completion_tokens == n_total


def test_completion_on_a_budget_equals_generate_on_its_slice(live, budget_server):
    prompt = [9, 20, 30, 11, 12]
    for b in budget_server.elastic.ecfg.budgets:
        r = client(live).completions.create(model=f"{NAME}@{b:g}", prompt=prompt, max_tokens=9, temperature=0,
                                            extra_body=RAW)
        ids = generate(budget_server.model(b), [prompt], GenerationConfig(max_new_tokens=9,
                                                                          stop_token_ids=(budget_server.eos_id,)))[0]
        ids = ids[:-1] if ids[-1] == budget_server.eos_id else ids
        assert r.choices[0].text == budget_server.elastic.model.tokenizer.decode(ids, skip_special_tokens=False)


def test_sixteen_concurrent_clients_get_their_one_at_a_time_outputs(live, budget_server):
    cases = [CASES[i % len(CASES)][:3] + (6 + i % 5, 3 + i % 4) for i in range(16)]
    sched = scheduler_of(live)
    sched.peak_rows = 0

    async def all_at_once():
        c = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*(c.chat.completions.create(**chat_kwargs(case)) for case in cases))

    results = asyncio.run(all_at_once())
    assert sched.peak_rows > 1  # requests really shared decode steps
    for case, r in zip(cases, results):
        reasoning, answer, n_think, _ = reference(budget_server, case)
        assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (reasoning, answer)
        assert r.usage.completion_tokens_details.reasoning_tokens == n_think


def test_streaming_equals_non_streaming(live):
    c = client(live)
    for case in CASES[:3]:
        whole = c.chat.completions.create(**chat_kwargs(case, stop=["a", "3"]))
        chunks = list(c.chat.completions.create(**chat_kwargs(case, stop=["a", "3"], stream=True,
                                                                stream_options={"include_usage": True})))
        reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert (reasoning, content) == (whole.choices[0].message.reasoning_content, whole.choices[0].message.content)
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    body = dict(model=NAME, prompt="12+3=", max_tokens=8, temperature=0, stop=["4"],
                extra_body={"think_budget": 0.5, "max_think_tokens": 5} | RAW)
    whole = c.completions.create(**body).choices[0].text
    assert "".join(ch.choices[0].text for ch in c.completions.create(**body, stream=True)) == whole


def test_stop_string_cuts_the_answer_like_generate(live, budget_server):
    case = ("1+2=?", 0.5, 1.0, 10, 6)
    _, answer, _, _ = reference(budget_server, case)
    stop = answer[2:4]
    r = client(live).chat.completions.create(**chat_kwargs(case, stop=[stop]))
    assert r.choices[0].message.content == answer[: answer.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_seeds_differ(live):
    c = client(live)
    kw = dict(model=f"{NAME}@0.5", prompt="7*8=", max_tokens=12, temperature=1.0, top_p=0.9, extra_body=RAW)
    a, b = (c.completions.create(seed=11, **kw).choices[0].text for _ in range(2))
    others = {c.completions.create(seed=s, **kw).choices[0].text for s in range(12, 16)}
    assert a == b
    assert len(others | {a}) > 1


@pytest.fixture(scope="module")
def slow_live(budget_server):
    """Decode steps slower than a client's patience, whatever the machine's speed."""
    with serve(SlowServer.from_elastic(budget_server.elastic), max_batch=32) as bg:
        yield bg


def test_client_disconnect_mid_stream_frees_the_slot(slow_live):
    sched = scheduler_of(slow_live)
    dropped = sched.dropped
    with httpx.Client(timeout=30) as h:
        body = {"model": f"{NAME}@1", "prompt": "1", "max_tokens": 150, "temperature": 0, "stream": True}
        with h.stream("POST", slow_live.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert sched.active_jobs() == 1
    deadline = time.monotonic() + 10
    while sched.active_jobs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sched.active_jobs() == 0
    assert sched.dropped == dropped + 1
    r = client(slow_live).completions.create(model=f"{NAME}@1", prompt="1", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_client_gone_before_a_non_streaming_answer_frees_the_slot(slow_live):
    sched = scheduler_of(slow_live)
    dropped = sched.dropped
    body = {"model": f"{NAME}@1", "prompt": "1", "max_tokens": 150, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_live.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 10
    while sched.active_jobs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched.active_jobs() == 0
    assert sched.dropped == dropped + 1  # cancelled, not run to its end


def test_a_dead_engine_process_ends_requests_with_errors_and_reports_503(budget_server):
    """The engine process killed mid-stream: the open stream ends with an in-band error, /health and
    new requests answer 503 with the reason at once (no hang, no 200)."""
    with serve(SlowServer.from_elastic(budget_server.elastic)) as bg:
        body = {"model": f"{NAME}@1", "prompt": "1", "max_tokens": 150, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as h, h.stream("POST", bg.url + "/v1/completions", json=body) as r:
            lines = (line for line in r.iter_lines() if line)
            assert "choices" in json.loads(next(lines)[len("data: "):])
            os.kill(scheduler_of(bg).pid, signal.SIGKILL)
            rest = [line[len("data: "):] for line in lines]
        assert rest[-1] == "[DONE]"
        assert "engine process exited" in json.loads(rest[-2])["error"]["message"]
        health = httpx.get(bg.url + "/health")
        assert health.status_code == 503 and "exit code -9" in health.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError, match="engine process exited") as err:
            client(bg).completions.create(model=f"{NAME}@1", prompt="1", max_tokens=2)
        assert err.value.status_code == 503


def test_api_key_is_required_when_set(budget_server):
    with serve(budget_server, api_key="s3cret") as bg:
        with pytest.raises(openai.AuthenticationError):
            client(bg, api_key="wrong").models.list()
        assert httpx.get(bg.url + "/v1/models").status_code == 401
        assert [m.id for m in client(bg, api_key="s3cret").models.list().data][0] == NAME


def test_proxy_over_two_servers_equals_in_process(budget_server, live):
    """Think on one server's 0.5 slice, answer on another's 1.0: same as in-process 0.5 → 1.0."""
    tok = budget_server.elastic.model.tokenizer
    with serve(budget_server) as answerer:  # the thinker is `live`
        app = make_proxy_app(f"{live.url}#{NAME}@0.5", f"{answerer.url}/v1#{NAME}@1", tok,
                             ServeConfig(name="proxy"))
        with BackgroundServer(app) as proxy:
            for msg, cap in (("1+2=?", 10), ("abc", 3), ("12*3=?", 0), ("x", 30)):
                case = (msg, 0.5, 1.0, cap, 6)
                r = client(proxy).chat.completions.create(
                    model="proxy", messages=[{"role": "user", "content": msg}], temperature=0, max_tokens=6,
                    extra_body={"max_think_tokens": cap} | RAW)
                reasoning, answer, n_think, n_total = reference(budget_server, case)
                assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (reasoning, answer)
                assert r.usage.completion_tokens_details.reasoning_tokens == n_think
                assert r.usage.completion_tokens == n_total
            chunks = list(client(proxy).chat.completions.create(
                model="proxy", messages=[{"role": "user", "content": "abc"}], temperature=0, max_tokens=6,
                stream=True, extra_body={"max_think_tokens": 3} | RAW))
            streamed = ("".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks),
                        "".join(ch.choices[0].delta.content or "" for ch in chunks))
            assert streamed == reference(budget_server, ("abc", 0.5, 1.0, 3, 6))[:2]
            with pytest.raises(openai.BadRequestError, match="fixed by"):
                client(proxy).chat.completions.create(model="proxy", messages=[{"role": "user", "content": "1"}],
                                                      extra_body={"think_budget": 0.5})


def test_serves_a_checkpoint_with_named_architectures(budget_server, tmp_path):
    """`serve CKPT --arch-file V --think NAME --answer full` (a sorted checkpoint with no router, its
    variants named as generate and eval name them): the answers of router budgets of the same
    architectures; a request's budget is refused in the resolver's words."""
    import dataclasses
    import json

    from star_elastic.cli import build_parser, load_config
    from star_elastic.hf import save_model
    from star_elastic.serve.app import app_for

    elastic = budget_server.elastic
    save_model(elastic.model, tmp_path / "ckpt")
    small = dataclasses.asdict(elastic.architecture(0.5)) | {"layers": list(elastic.architecture(0.5).layers)}
    (tmp_path / "variants.json").write_text(json.dumps({"nano-12b": small}))
    args = build_parser(only="serve").parse_args(["serve", str(tmp_path / "ckpt"), "--arch-file",
                                                  str(tmp_path / "variants.json"), "--think", "nano-12b",
                                                  "--answer", "full", "--name", NAME])
    with BackgroundServer(app_for(load_config(args.command_spec, args))) as bg:
        c = client(bg)
        assert [m.id for m in c.models.list().data] == [NAME, f"{NAME}@full", f"{NAME}@nano-12b"]
        for case in (("1+2=?", 0.5, 1.0, 10, 6), ("abc", 0.5, 1.0, 3, 6)):
            r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": case[0]}], temperature=0,
                                          max_tokens=6, extra_body={"max_think_tokens": case[3]} | RAW)
            reasoning, answer, _, _ = reference(budget_server, case)
            assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (reasoning, answer)
        with pytest.raises(openai.BadRequestError, match="think_budget 0.5 is not a variant of the architectures "
                                                         "file; choose one of full, nano-12b"):
            c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "1"}],
                                      extra_body={"think_budget": 0.5})


def test_serve_cli_answers_like_in_process_and_stops_cleanly_on_ctrl_c(budget_server, tmp_path):
    """`star-elastic serve RUN` in its own process group: a chat answer equals in-process budget control;
    Ctrl-C (SIGINT to the whole group, as a terminal sends it) stops the server and its engine process with
    exit code 0 and no traceback."""
    import socket
    import subprocess
    import sys

    from star_elastic.elastic.run import save_run

    save_run(budget_server.elastic, tmp_path / "run")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "star_elastic.cli", "serve", str(tmp_path / "run"), "--port",
                             str(port), "--threads", "1"], stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        engine = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        case = ("1+2=?", 0.5, 1.0, 10, 6)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(**(chat_kwargs(case) | {"model": "run"}))
        answer = (r.choices[0].message.reasoning_content, r.choices[0].message.content)
        assert answer == reference(budget_server, case)[:2]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in proc.stderr.read()
    deadline = time.monotonic() + 20  # the engine and multiprocessing's resource tracker exit after the server
    while any(_running(pid) for pid in engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine and not any(_running(pid) for pid in engine)


def _running(pid: int) -> bool:
    """A live process (an exited one whose parent is gone may linger as a zombie until init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
