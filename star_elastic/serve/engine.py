"""What the HTTP layer asks of a generation backend, and the in-process one over the scheduler.

A `Spec` is one sequence to generate (already validated); `Engine.run(spec)` yields `Progress`
snapshots as text grows and a last one with `finish` set (`run(spec, partial=False)`: the last one
only, for non-streaming responses). `LocalEngine` runs specs on the scheduler (one weight copy,
every budget; in its own process, serve/worker.py); `star_elastic.serve.proxy.ProxyEngine` runs
them on two OpenAI-compatible backends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Sequence

from jinja2 import TemplateError

from star_elastic import accounting
from star_elastic.infer.budget import Job
from star_elastic.infer.generate import GenerationConfig, Logprob
from star_elastic.serve.errors import RequestError
from star_elastic.serve.worker import EngineProcess


@dataclasses.dataclass
class Spec:
    """One sequence: a text or token-id prompt, its budgets, caps and sampling."""

    prompt: str | list[int]
    answer_budget: float | str
    think_budget: float | str | None  # None: one phase (a plain completion on answer_budget)
    max_think_tokens: int
    max_tokens: int
    sampling: GenerationConfig  # temperature, top_p, seed, stop strings, logprobs (top K)
    skip_special_tokens: bool = True
    echo: bool = False  # with sampling.logprobs: score the prompt too (Progress.prompt_logprobs)
    request_id: str = ""  # the HTTP response's id: in the log and in the error of a failed generation


@dataclasses.dataclass
class Progress:
    """Text so far; `reasoning` excludes the closing </think>, `content` excludes eos."""

    reasoning: str = ""
    content: str = ""
    prompt_tokens: int = 0
    reasoning_tokens: int = 0  # includes the </think> that closed the trace
    content_tokens: int = 0
    finish: str | None = None
    forced_end_of_think: bool = False
    stop_reason: str | None = None  # the stop string that ended the answer, if one did
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    think_ids: list[int] = dataclasses.field(default_factory=list)  # the trace and its closing token
    answer_ids: list[int] = dataclasses.field(default_factory=list)  # the answer and its eos, if any
    trace_end: int = 0  # think_ids[:trace_end] make `reasoning` (the closing token excluded)
    body_end: int = 0  # answer_ids[:body_end] make `content` (eos excluded)
    # with Spec.sampling.logprobs: one per id above (None: not sampled, e.g. a forced </think>),
    # the think budget's for think_ids, the answer budget's for answer_ids and prompt_ids
    prompt_logprobs: list[Logprob | None] | None = None  # with Spec.echo; the first token's None
    think_logprobs: list[Logprob | None] = dataclasses.field(default_factory=list)
    answer_logprobs: list[Logprob | None] = dataclasses.field(default_factory=list)


class Mailbox:
    """Worker-thread events → asyncio queues of one loop: one loop wake-up per batch of posts
    (about one per scheduler step) instead of one per job and step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self._lock, self._items, self._scheduled = loop, threading.Lock(), [], False

    def post(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class LocalEngine:
    """Specs → scheduler jobs on an ElasticServer-like object (`model(budget)`, `think_row`, ...)."""

    def __init__(self, server, budgets: Sequence[float | str], max_batch: int, max_context: int,
                 threads: int | None = None):
        self.server, self.budgets, self.max_context = server, list(budgets), max_context
        self.tokenizer = server.model(self.budgets[0]).tokenizer
        self.vocab_size = server.model(self.budgets[0]).config.vocab_size
        for budget in self.budgets:  # every view built here, pickled with the server: the engine process builds none
            server.model(budget)
        self.facts = {b: budget_facts(server, b) for b in self.budgets}
        self.scheduler = EngineProcess(server, max_batch, threads=threads)  # the decode loop, in its own process
        self._mailbox: Mailbox | None = None
        self._texts: dict[tuple[int, bool], str] = {}

    def close(self) -> None:
        self.scheduler.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def chat_prompt(self, messages: list[dict]) -> str:
        return chat_prompt(self.tokenizer, messages)

    def token_text(self, token: int, skip_special_tokens: bool = False) -> str:
        """One token's text decoded alone (cached)."""
        key = (token, skip_special_tokens)
        if key not in self._texts:
            self._texts[key] = self.tokenizer.decode([token], skip_special_tokens=skip_special_tokens)
        return self._texts[key]

    def failure(self) -> str | None:
        """Why no request can be served now (the engine process is gone), else None."""
        return self.scheduler.failure

    def check(self, spec: Spec) -> None:
        """Raise the request's 4xx (or the dead engine's 503) now, before a stream opens."""
        self.encode(spec)
        self._check_alive()

    def _check_alive(self) -> None:
        failure = self.failure()
        if failure is not None:
            raise RequestError(failure, status=503, code="engine_unavailable")

    def encode(self, spec: Spec) -> list[int]:
        if isinstance(spec.prompt, str):
            ids = self.tokenizer.encode(spec.prompt, add_special_tokens=False)
        else:
            ids = list(spec.prompt)
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        need = len(ids) + (spec.max_think_tokens + 1 if spec.think_budget is not None else 0) + spec.max_tokens
        if need > self.max_context:
            raise RequestError(
                f"this model's context is {self.max_context} tokens; the prompt ({len(ids)}) plus the think cap "
                f"and max_tokens need {need}: shorten the prompt or lower the caps",
                param="prompt", code="context_length_exceeded")
        return ids

    async def run(self, spec: Spec, partial: bool = True) -> AsyncIterator[Progress]:
        ids = self.encode(spec)
        self._check_alive()
        mailbox = self._mailbox_for(asyncio.get_running_loop())
        events: asyncio.Queue = asyncio.Queue()
        job = Job(ids, spec.answer_budget, spec.max_tokens, spec.sampling,
                  emit=lambda evs: mailbox.post(events, evs),
                  think_budget=spec.think_budget, max_think_tokens=spec.max_think_tokens, echo=spec.echo,
                  request_id=spec.request_id)
        self.scheduler.submit(job)
        prog = Progress(prompt_tokens=len(ids), prompt_ids=ids)
        scores = prog.answer_logprobs  # where the next "logprob" event goes: after its token's phase
        try:
            while True:
                for kind, value in await events.get():  # one scheduler step's events
                    if kind == "error":
                        raise self._error(value)
                    if kind == "think":
                        prog.think_ids.append(value)
                        scores = prog.think_logprobs
                    elif kind == "answer":
                        prog.answer_ids.append(value)
                        scores = prog.answer_logprobs
                    elif kind == "logprob":
                        scores.append(value)
                    elif kind == "prompt_logprobs":
                        prog.prompt_logprobs = value
                    else:
                        prog.finish, prog.forced_end_of_think = value, job.forced_end_of_think
                if partial or prog.finish is not None:  # text is decoded only where it is read
                    self._fill(prog, spec.skip_special_tokens)
                    yield prog
                if prog.finish is not None:
                    return
        finally:
            self.scheduler.cancel(job)  # a client gone mid-stream frees its slot at the next step boundary

    def _mailbox_for(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        if self._mailbox is None or self._mailbox.loop is not loop:  # one loop serves the app; tests may start others
            self._mailbox = Mailbox(loop)
        return self._mailbox

    def _error(self, message: str) -> RequestError:
        """A job's error event: 503 when the engine process is gone, else 500 (this request's generation failed)."""
        if self.failure() is not None:
            return RequestError(message, status=503, code="engine_unavailable")
        return RequestError(message, status=500, code="generation_failed")

    def _fill(self, prog: Progress, skip_special: bool) -> None:
        think, answer = prog.think_ids, prog.answer_ids
        closers = (self.server.think_end_id, self.server.eos_id)
        trace = think[:-1] if think and think[-1] in closers else think
        body = answer[:-1] if answer and answer[-1] == self.server.eos_id else answer
        prog.trace_end, prog.body_end = len(trace), len(body)
        prog.reasoning = self.tokenizer.decode(trace, skip_special_tokens=skip_special)
        prog.content = self.tokenizer.decode(body, skip_special_tokens=skip_special)
        prog.reasoning_tokens, prog.content_tokens = len(think), len(answer)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat template's text; a conversation the template refuses (a role out of place) is a 400."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:
        raise RequestError(f"messages: the model's chat template refuses them: {err}", param="messages") from None


def budget_facts(server, budget: float | str) -> dict:
    """What /v1/models tells of a budget: its parameter counts, active ones over the parent's
    (`active_params_ratio`), and for a router budget the run's target and achieved relative cost."""
    config = server.parent.config
    counts = accounting.count_params(server.architecture(budget).model_config(config))
    facts = {"total_params": counts.total_params, "active_params": counts.active_params,
             "active_params_ratio": counts.active_params / accounting.count_params(config).active_params}
    if server.elastic is not None and not isinstance(budget, str):
        described = server.elastic.describe(budget)
        facts |= {"budget_type": described["budget_type"], "target": described["target"],
                  "achieved": described["achieved"]}
    return facts
