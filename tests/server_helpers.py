"""A tiny elastic model with the demo tokenizer, served on 127.0.0.1 from a thread (its scheduler
in an engine process)."""

from __future__ import annotations

import functools
import time

from conftest import tiny_elastic

from star_elastic.data.tokenizer import build_tokenizer, format_prompt
from star_elastic.infer.budget import ElasticServer
from star_elastic.serve.app import BackgroundServer, ServeConfig, make_local_app

NAME = "tiny"
CONTEXT = 160


@functools.cache
def tiny_budget_server(seed: int = 3) -> ElasticServer:
    """Built once per test session (read-only: the server never writes weights)."""
    tok = build_tokenizer()
    elastic = tiny_elastic(seed=seed, vocab_size=len(tok), fit_steps=15)  # 3 distinct architectures  # every id decodes to text and back
    elastic.model.tokenizer = tok
    return ElasticServer.from_elastic(elastic)


class SlowServer(ElasticServer):
    """Every forward of every submodel first sleeps `DELAY` s: decoding slower than a client's
    patience on any machine. A subclass, not a monkeypatch: the server is pickled to the engine
    process, where a patch made in the test process would not reach."""

    DELAY = 0.1

    def model(self, key):
        view = super().model(key)
        if not view._forward_pre_hooks:
            view.register_forward_pre_hook(functools.partial(_sleep, self.DELAY))
        return view


def _sleep(seconds: float, *_):
    time.sleep(seconds)


class FailingServer(ElasticServer):
    """Requests whose prompt holds a marker fail in the engine process, the others are served as usual
    (a subclass, not a monkeypatch: the server is pickled to the engine process). FAIL_ANSWER: an
    exception while building the answer phase (that request alone fails); END_SCHEDULER: SystemExit at
    admission, which ends the scheduler's thread (the engine process then exits)."""

    FAIL_ANSWER, END_SCHEDULER = "zzz", "qqq"

    def _holds(self, prompt: list[int], marker: str) -> bool:
        ids = self.parent.tokenizer.encode(marker, add_special_tokens=False)
        return any(prompt[i : i + len(ids)] == ids for i in range(len(prompt)))

    def think_row(self, prompt, *args, **kwargs):
        if self._holds(list(prompt), self.END_SCHEDULER):
            raise SystemExit("injected: the scheduler thread ends")
        return super().think_row(prompt, *args, **kwargs)

    def answer_row(self, think, *args, **kwargs):
        if self._holds(think.prompt, self.FAIL_ANSWER):
            raise ValueError("injected failure in the answer phase")
        return super().answer_row(think, *args, **kwargs)


def serve(server: ElasticServer, **cfg) -> BackgroundServer:
    app = make_local_app(server, ServeConfig(name=NAME, **cfg), max_context=CONTEXT)
    return BackgroundServer(app)


def scheduler_of(bg: BackgroundServer):
    return bg.app.state.engine.scheduler


def reference(server, case) -> tuple[str, str, int, int]:
    """In-process two-phase result: (reasoning text, answer text, reasoning tokens, completion tokens).

    case = (user message, think budget, answer budget, think cap, answer cap); budgets may be variant names."""
    msg, tb, ab, cap, n = case
    tok = server.parent.tokenizer
    prompt = tok.encode(format_prompt(tok, msg), add_special_tokens=False)
    res = server.generate([prompt], tb, ab, max_think_tokens=cap, max_answer_tokens=n).results[0]
    trace = res.think_tokens[:-1] if res.think_tokens[-1] in (server.think_end_id, server.eos_id) else res.think_tokens
    answer = res.answer_tokens[:-1] if res.answer_tokens and res.answer_tokens[-1] == server.eos_id else res.answer_tokens
    text = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    return text(trace), text(answer), len(res.think_tokens), len(res.think_tokens) + len(res.answer_tokens)
