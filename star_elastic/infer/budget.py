"""Elastic budget control (paper, pipeline point 8): one submodel thinks, another answers.

Phase 1: the think submodel decodes the trace until it emits `</think>` (or eos), or until
`max_think_tokens`, where `</think>` is forced (the parent's default budget control).
Phase 2: the answer submodel prefills prompt + trace in one pass and decodes the answer.
When both are the same submodel, the answer instead continues the trace's own cache in place
(`answer_in_place`: no second prefill; the row feeds the trace's last token, and `</think>` where
it was forced, then decodes the answer in the same batch).
The phases are built per request (`think_row`, `close_trace`, `answer_row`) and run by one flow,
`TwoPhaseFlow`: a `DecodeBatch` per submodel, jobs moving from trace to answer between (or, in
place, inside) steps. `ElasticServer.generate` drives it over one batch of prompts; the HTTP
server's scheduler (`star_elastic.serve.scheduler`) drives it forever, admitting and cancelling jobs
between steps.
Every submodel is a view of the one set of elastic weights (`star_elastic.infer.views`), built
once per budget and cached.

A submodel is named by a router budget (float, elastic run folders) or by a variant name (str):
`ElasticServer.from_checkpoint(path, {"23b": Architecture, ...})` serves explicit architectures
of any sorted checkpoint that has no router (e.g. NVIDIA's Elastic checkpoints). What a command or
a request may name is decided by `resolve`, for `generate`, `eval` and `serve` alike.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from star_elastic.config import ConfigError, ModelConfig, typed_blocks
from star_elastic.elastic.arch import Architecture, load_arch_file
from star_elastic.elastic.run import load_elastic
from star_elastic.hf import load_model
from star_elastic.infer.generate import DecodeBatch, GenerationConfig, Row, decode_to_end, seeded_generator
from star_elastic.infer.views import view_model
from star_elastic.model.hybrid import HybridLM
from star_elastic.runtime import check_device, resolve_device
from star_elastic.slicing import checkpoint_dir


@dataclasses.dataclass
class PhaseResult:
    think_tokens: list[int]
    answer_tokens: list[int]
    forced_end_of_think: bool


@dataclasses.dataclass
class BudgetRun:
    """Outputs of one batch and the wall time of each phase."""

    results: list[PhaseResult]
    think_seconds: float
    answer_seconds: float


@dataclasses.dataclass
class PhaseConfig:
    """Which submodel thinks, which answers, and their caps: the same keys and defaults for
    `generate`, `eval` and `serve` (a request to the server may override each)."""

    think: float | str | None = None
    """The submodel that writes the <think> trace: a trained budget of the run (e.g. 0.5), or a variant
    name of --arch-file. Default: the largest (the parent)."""
    answer: float | str | None = None
    """The submodel that writes the answer, named as --think. Default: the largest."""
    max_think_tokens: int = 256
    """Cap on the trace; </think> is forced when it is reached."""
    max_answer_tokens: int = 64
    """Cap on the answer."""

    def __post_init__(self) -> None:
        if self.max_think_tokens < 0 or self.max_answer_tokens < 1:
            raise ConfigError(f"need max_think_tokens >= 0 and max_answer_tokens >= 1, got "
                              f"{self.max_think_tokens} and {self.max_answer_tokens}")

    def submodels(self, variants: Sequence[float | str]) -> tuple[float | str, float | str]:
        """The think and answer submodels among `variants` (`resolve`, naming --think / --answer)."""
        return resolve(self.think, variants, "--think"), resolve(self.answer, variants, "--answer")


@dataclasses.dataclass
class GenerateConfig:
    """`star-elastic generate`: one prompt, budget-controlled."""

    run: str = ""
    """An elastic run folder, or a sorted checkpoint folder with --arch-file."""
    prompt: str = ""
    """The user message."""
    arch_file: str | None = None
    """Explicit architectures instead of the router: JSON {"12b": {"hidden": 1536, ...}, ...} as for slice;
    their names are what --think / --answer take ("full" is always there)."""
    phases: PhaseConfig = dataclasses.field(default_factory=PhaseConfig)
    """Think and answer submodels and caps."""
    device: str = "auto"
    """auto (CUDA where present), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        typed_blocks(self)
        check_device(self.device)
        if not self.run:
            raise ConfigError("generate needs RUN_OR_CKPT")


def variant_label(key: float | str) -> str:
    """A budget as a person writes it (0.5, 1), a variant name as it is."""
    return f"{key:g}" if isinstance(key, float) else str(key)


def resolve(key: float | str | None, variants: Sequence[float | str], field: str) -> float | str:
    """What a command or a request may name, in one place (`generate`, `eval`, `serve` and each
    request to the server): one of `variants`, the trained budgets (numbers; an int names the
    float equal to it) or the variant names of explicit architectures; None is the first (the
    largest). Budgets between the trained ones are not served: only trained budgets are held to
    their cost. Anything else is a ConfigError naming `field`, the value and the choices."""
    if key is None:
        return variants[0]
    for v in variants:
        if _names(key, v):
            return v
    shown = ", ".join(variant_label(v) for v in variants)
    kind = "a variant of the architectures file" if isinstance(variants[0], str) else "a trained budget"
    raise ConfigError(f"{field} {key!r} is not {kind}; choose one of {shown}")


def _names(key, variant: float | str) -> bool:
    """Whether `key` is `variant`: the same name, or the same number exactly (text is not a number here)."""
    if isinstance(key, bool):
        return False
    if isinstance(variant, str):
        return key == variant
    return isinstance(key, (int, float)) and key == variant


class ElasticServer:
    """Submodels by budget (router) or by variant name (explicit architectures), all views of one parent."""

    def __init__(self, elastic, think_end_id: int, eos_id: int, archs: dict[str, Architecture] | None = None,
                 parent: HybridLM | None = None):
        self.elastic, self.think_end_id, self.eos_id = elastic, think_end_id, eos_id
        self.parent = parent if parent is not None else elastic.model
        self.archs = dict(archs or {})
        self._models: dict[float | str, HybridLM] = {}

    @classmethod
    def from_elastic(cls, elastic) -> ElasticServer:
        return cls(elastic, *_think_and_eos(elastic.model.tokenizer))

    @classmethod
    def from_checkpoint(cls, path, archs: dict[str, Architecture], device="cpu") -> ElasticServer:
        """A sorted checkpoint without a router: submodels named by `archs` (plus "full")."""
        parent = load_model(path, device=device)
        for arch in archs.values():
            arch.validate(parent.config)
        named = {"full": Architecture.full(parent.config)} | dict(archs)
        return cls(None, *_think_and_eos(parent.tokenizer), archs=named, parent=parent)

    @property
    def variants(self) -> list[float | str]:
        """What `model()` accepts: the trained budgets, or the architecture names ("full" first)."""
        return list(self.archs) if self.elastic is None else list(self.elastic.ecfg.budgets)

    def architecture(self, key: float | str) -> Architecture:
        if isinstance(key, str):
            if key not in self.archs:
                raise ConfigError(f"unknown variant {key!r}; known: {', '.join(self.archs) or 'none (give --arch-file)'}")
            return self.archs[key]
        if self.elastic is None:
            raise ConfigError(f"budget {key:g} needs a router (an elastic run); this checkpoint has variants "
                              f"{', '.join(self.archs)}")
        return self.elastic.architecture(key)

    def model(self, key: float | str) -> HybridLM:
        if key not in self._models:
            self._models[key] = view_model(self.parent, self.architecture(key))
        return self._models[key]

    def think_row(self, prompt: Sequence[int], max_think_tokens: int, sampling: GenerationConfig | None = None,
                  generator: torch.Generator | None = None) -> Row:
        """Phase 1 of one request: decode the trace until </think> or eos, at most `max_think_tokens`.

        `sampling` gives temperature / top_p (its stop strings apply to the answer only)."""
        base = sampling or GenerationConfig()
        cfg = dataclasses.replace(base, max_new_tokens=max_think_tokens, stop_token_ids=(self.think_end_id, self.eos_id),
                                  stop_strings=())
        return Row(list(prompt), cfg, generator)

    def close_trace(self, think: Row) -> bool:
        """Force </think> onto a trace that hit the cap; True when forced."""
        if think.tokens and think.tokens[-1] in (self.think_end_id, self.eos_id):
            return False
        think.tokens.append(self.think_end_id)
        if think.on_token is not None:
            think.on_token(self.think_end_id)
        return True

    def answer_row(self, think: Row, max_answer_tokens: int, sampling: GenerationConfig | None = None) -> Row:
        """Phase 2: prompt + closed trace, re-prefilled by the answer model, decoded until eos."""
        base = sampling or GenerationConfig()
        cfg = dataclasses.replace(base, max_new_tokens=max_answer_tokens, stop_token_ids=(self.eos_id,))
        return Row(think.prompt + think.tokens, cfg, think.generator)

    def answer_in_place(self, think: Row, max_answer_tokens: int,
                        sampling: GenerationConfig | None = None) -> tuple[bool, Row] | None:
        """Phase 2 on the think model's own cache (think budget == answer budget): close the finished
        trace (`close_trace`) and return (forced, answer row). The row takes the think row's place in
        its batch and first feeds what that cache has not seen: the trace's last sampled token, and
        the forced `</think>`. None, trace left open, when the answer may have no tokens (it then
        goes through `close_trace`, `answer_row` and a prefill)."""
        if max_answer_tokens == 0:
            return None
        forced = self.close_trace(think)
        row = self.answer_row(think, max_answer_tokens, sampling)
        row.forced = list(think.tokens[-(2 if forced else 1):])
        return forced, row

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        think_budget: float | str,
        answer_budget: float | str,
        max_think_tokens: int = PhaseConfig.max_think_tokens,
        max_answer_tokens: int = PhaseConfig.max_answer_tokens,
        on_token: Callable[[str, int, int], None] | None = None,
    ) -> BudgetRun:
        """Greedy budget control of a batch of prompts (each ends inside the assistant turn, right after
        `<think>`) by the flow the server runs, `TwoPhaseFlow`; budgets are budgets or variant names.
        `on_token(phase, i, token)` sees prompt i's tokens ("think" or "answer") step by step. The
        think time ends when the last trace closes; a failure raises its exception."""
        flow = TwoPhaseFlow(self)
        jobs = [Job(list(p), answer_budget, max_answer_tokens, GenerationConfig(), think_budget=think_budget,
                    max_think_tokens=max_think_tokens) for p in prompts]
        index = {job: i for i, job in enumerate(jobs)}
        t0, t1 = time.perf_counter(), None
        for job in jobs:
            flow.start(job)
        while True:
            for job, events in flow.drain():
                if job.failed:
                    raise job.error
                for kind, value in events:
                    if on_token is not None and kind in ("think", "answer"):
                        on_token(kind, index[job], value)
            if t1 is None and all(job.answer is not None for job in jobs):
                t1 = time.perf_counter()
            if all(job.finish is not None for job in jobs):
                break
            flow.advance()
        results = [PhaseResult(job.think.tokens, job.answer.tokens, job.forced_end_of_think) for job in jobs]
        return BudgetRun(results, t1 - t0, time.perf_counter() - t1)

    @torch.inference_mode()
    def think(self, prompts: Sequence[Sequence[int]], budget: float | str,
              max_think_tokens: int) -> tuple[list[Row], list[bool]]:
        """Phase 1 of a batch on its own: the closed traces (rows whose tokens end with `</think>`
        or eos) and whether each `</think>` was forced. A trace can be answered by several budgets
        (`answer` leaves it as it is)."""
        thinks = [self.think_row(p, max_think_tokens) for p in prompts]
        batch = DecodeBatch(self.model(budget))
        batch.join(thinks)
        decode_to_end(batch)
        return thinks, [self.close_trace(t) for t in thinks]

    @torch.inference_mode()
    def answer(self, thinks: Sequence[Row], budget: float | str, max_answer_tokens: int) -> list[Row]:
        """Phase 2 of a batch of closed traces: prompt + trace prefilled by `budget`'s model."""
        answers = [self.answer_row(t, max_answer_tokens) for t in thinks]
        batch = DecodeBatch(self.model(budget))
        batch.join(answers)
        decode_to_end(batch)
        return answers


Event = tuple[str, object]


@dataclasses.dataclass(eq=False)
class Job:
    """One sequence through the flow: a trace on `think_budget`, then an answer on `answer_budget`
    (`think_budget` None: a single phase on `answer_budget`, a plain completion).

    Its events, in order: ("think", id), ("answer", id), and last ("done", finish) or ("error", message);
    with `sampling.logprobs` each token event is followed by ("logprob", Logprob or None) (None: a
    `</think>` forced at the cap, not sampled), and an echoed prompt's scores come as
    ("prompt_logprobs", [None, Logprob, ...])."""

    prompt: list[int]
    answer_budget: float | str
    max_tokens: int
    """Cap on the answer."""
    sampling: GenerationConfig
    emit: Callable[[list[Event]], None] | None = None
    """Where the server's scheduler hands each step's events (from its worker thread)."""
    think_budget: float | str | None = None
    max_think_tokens: int = 0
    echo: bool = False
    """Score the prompt (with `sampling.logprobs` set): on the answer budget's model, by the first
    prefill of it that covers the prompt."""
    request_id: str = ""
    """The HTTP request's id, for the log and the error message."""
    cancelled: bool = False
    failed: bool = False
    error: BaseException | None = None
    """Why it failed."""
    finish: str | None = None
    """The answer's finish ("stop" or "length") once done."""
    think: Row | None = None
    answer: Row | None = None
    forced_end_of_think: bool = False
    key: int | None = None  # its id between the HTTP process and the engine process (serve/worker.py)
    events: list[Event] = dataclasses.field(default_factory=list)  # not yet drained

    def cancel(self) -> None:
        self.cancelled = True  # read by the server's worker at the next step boundary


class TwoPhaseFlow:
    """The two-phase protocol over continuous batches: one `DecodeBatch` per budget, rows joining it
    between steps and leaving when done.

    A job starts by queueing its first row (the trace, or the single phase's answer) for its budget.
    Rows waiting for a budget join its batch in one batched prefill, once they are as many as its
    running rows or the oldest has waited `join_wait` steps (a prefill costs several decode steps
    whatever its batch: per-op overhead dominates small models). A trace that ends in its answer
    budget's batch continues there as the answer, on its own cache (`answer_in_place`, inside the
    step); any other trace is closed and its answer (prompt + trace) queued for the answer budget.
    Rows never influence each other, so a greedy job's tokens do not depend on its neighbours.

    Failures stay with their job. A job's own work (its generator and rows, the step from trace to
    answer, its sampling and log-probabilities inside a step: `DecodeBatch(isolate_rows=True)`) runs
    guarded: an exception ends that job with an "error" event and `error` set; `drop` then takes its
    rows out, as a cancelled job's. A failed prefill fails only the rows it was joining; a failed
    decode forward fails every job of that budget's batch (its cache is then in an unknown state) and
    the batch is rebuilt by later jobs."""

    def __init__(self, server: ElasticServer, join_wait: int = 4):
        self.server, self.join_wait = server, join_wait
        self.steps = 0
        self.peak_rows = 0  # most rows decoding at once over all budgets (a measure of batching)
        self._batches: dict[float | str, DecodeBatch] = {}
        self._joining: dict[float | str, list[Row]] = defaultdict(list)
        self._waiting_since: dict[float | str, int] = {}  # budget -> step its oldest waiting row arrived
        self._jobs: dict[int, Job] = {}  # id(row) -> job, for rows in a batch or about to join
        self._told: dict[Job, None] = {}  # jobs with events to drain (insertion-ordered)

    # --- driving it --------------------------------------------------------------------------
    def start(self, job: Job) -> None:
        """Queue the job's first row (guarded: a failure fails the job)."""
        self._per_job(job, self._start, job)

    def advance(self) -> None:
        """One step: the due rows join their batches, then every budget's batch decodes one token."""
        try:
            self._join_waiting()
            for budget, batch in list(self._batches.items()):
                if batch.rows:
                    self._step(budget, batch)
        finally:
            self.steps += 1

    def drain(self) -> list[tuple[Job, list[Event]]]:
        """Each job's events since the last drain, jobs in the order they were first told."""
        out = [(job, job.events) for job in self._told]
        for job, _ in out:
            job.events = []
        self._told.clear()
        return out

    def drop(self, jobs: list[Job]) -> None:
        """The rows of these jobs (cancelled or failed) leave their batches and queues."""
        rows = {id(r) for job in jobs for r in (job.think, job.answer) if r is not None}
        for batch in self._batches.values():
            batch.leave([r for r in batch.rows if id(r) in rows])
        for budget in self._joining:
            self._joining[budget] = [r for r in self._joining[budget] if id(r) not in rows]
            if not self._joining[budget]:
                self._waiting_since.pop(budget, None)
        for key in rows:
            self._jobs.pop(key, None)

    def fail(self, job: Job, err: BaseException) -> None:
        """End `job` with an error event naming its request id; its rows leave at `drop`."""
        if job.failed or job.cancelled:
            return
        self._tell(job, ("error", f"generation failed (request {job.request_id or 'without id'}): "
                                  f"{type(err).__name__}: {err}"))
        job.failed, job.error = True, err

    def reset(self) -> None:
        """Forget every batch and queued row (after a failure outside any job's own work)."""
        self._batches.clear()
        self._joining.clear()
        self._waiting_since.clear()
        self._jobs.clear()

    # --- a job's transitions -----------------------------------------------------------------
    def _start(self, job: Job) -> None:
        """The job's generator and first row, queued to join its budget's batch."""
        gen = seeded_generator(job.sampling.seed, self.server.model(job.answer_budget).device)
        scores_prompt = job.echo and job.sampling.logprobs is not None
        if job.think_budget is None:
            row = Row(job.prompt, dataclasses.replace(job.sampling, max_new_tokens=job.max_tokens,
                                                      stop_token_ids=(self.server.eos_id,)), gen)
            job.answer = row
            row.score_prompt = len(job.prompt) if scores_prompt else 0
            self._enqueue(job, row, job.answer_budget, "answer")
        else:
            job.think = self.server.think_row(job.prompt, job.max_think_tokens, job.sampling, gen)
            same = job.think_budget == job.answer_budget  # the think model is the answer model
            job.think.score_prompt = len(job.prompt) if scores_prompt and same else 0
            self._enqueue(job, job.think, job.think_budget, "think")

    def _continue(self, row: Row) -> Row | None:
        """A trace that ends in its own answer budget's batch: the answer continues its cache there
        (called inside `DecodeBatch.step`; the think row then reaches `_finished` unmapped)."""
        job = self._jobs.get(id(row))
        if job is None or job.cancelled or job.failed or row is not job.think or job.think_budget != job.answer_budget:
            return None
        done = self.server.answer_in_place(row, job.max_tokens, job.sampling)
        if done is None:  # an empty answer goes the prefill way (`_finished`)
            return None
        job.forced_end_of_think, answer = done
        job.answer = answer
        del self._jobs[id(row)]
        self._jobs[id(answer)] = job
        answer.on_token = lambda tok: self._tell_token(job, answer, "answer", tok)
        return answer

    def _finished(self, rows: list[Row]) -> None:
        for row in rows:
            job = self._jobs.pop(id(row), None)
            if job is None or job.cancelled or job.failed:
                continue
            if row.error is not None:
                self.fail(job, row.error)
            elif row is job.think:
                self._per_job(job, self._answer_phase, job, row)
            else:
                job.finish = row.finish
                self._tell(job, ("done", row.finish))

    def _answer_phase(self, job: Job, think: Row) -> None:
        """A trace that left its batch: close it, queue the answer (re-prefilled by the answer budget)."""
        job.forced_end_of_think = self.server.close_trace(think)
        job.answer = self.server.answer_row(think, job.max_tokens, job.sampling)
        if job.echo and job.sampling.logprobs is not None and job.think_budget != job.answer_budget:
            job.answer.score_prompt = len(job.prompt)  # its prefill of prompt + trace covers the prompt
        self._enqueue(job, job.answer, job.answer_budget, "answer")

    def _enqueue(self, job: Job, row: Row, budget: float | str, phase: str) -> None:
        row.on_token = lambda tok: self._tell_token(job, row, phase, tok)
        self._jobs[id(row)] = job
        self._joining[budget].append(row)
        self._waiting_since.setdefault(budget, self.steps)

    # --- batches -----------------------------------------------------------------------------
    def _due(self, budget: float | str, waiting: int) -> bool:
        """Prefill now, or let more rows gather for one batched prefill."""
        batch = self._batches.get(budget)
        running = len(batch.rows) if batch is not None else 0
        return waiting >= running or self.steps - self._waiting_since[budget] >= self.join_wait

    def _join_waiting(self) -> None:
        """Batched prefill of the rows waiting for each budget; rows with 0 tokens to go finish here."""
        for budget, rows in list(self._joining.items()):
            if not rows or not self._due(budget, len(rows)):
                continue
            self._joining[budget] = []
            del self._waiting_since[budget]
            batch = self._batches.get(budget)
            if batch is None:
                model = self.server.model(budget)
                batch = self._batches[budget] = DecodeBatch(model, tokenizer=model.tokenizer,
                                                            continuation=self._continue, isolate_rows=True)
            try:
                batch.join(rows)
            except Exception as err:  # noqa: BLE001 - the prefill failed: its rows' jobs, not the running batch
                self._fail_rows(rows, err)
                continue
            for row in rows:
                job = self._jobs.get(id(row))
                if row.prompt_logprobs is not None and job is not None:
                    self._tell(job, ("prompt_logprobs", row.prompt_logprobs))
            self._finished([r for r in rows if r.finish is not None])
        self.peak_rows = max(self.peak_rows, sum(len(b.rows) for b in self._batches.values()))

    def _step(self, budget: float | str, batch: DecodeBatch) -> None:
        """One decode step of a budget's batch; a failed forward fails every job that was in it."""
        before = list(batch.rows)
        try:
            finished = batch.step()
        except Exception as err:  # noqa: BLE001 - the batch's cache is in an unknown state: drop it
            del self._batches[budget]
            self._fail_rows(before + batch.rows, err)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        self._finished(finished)

    # --- events and failures -----------------------------------------------------------------
    def _tell(self, job: Job, event: Event) -> None:
        if job.failed:
            return
        job.events.append(event)
        self._told[job] = None

    def _tell_token(self, job: Job, row: Row, phase: str, tok: int) -> None:
        self._tell(job, (phase, tok))
        if row.cfg.logprobs is not None:  # a token appended without sampling (a forced </think>) has none
            sampled = len(row.token_logprobs) == len(row.tokens)
            self._tell(job, ("logprob", row.token_logprobs[-1] if sampled else None))

    def _per_job(self, job: Job, work: Callable, *args) -> None:
        """Run one job's own work; an exception fails that job only."""
        try:
            work(*args)
        except Exception as err:  # noqa: BLE001 - one request's failure is that request's
            self.fail(job, err)

    def _fail_rows(self, rows: list[Row], err: Exception) -> None:
        for row in rows:
            job = self._jobs.pop(id(row), None)
            if job is not None:
                self.fail(job, err)


def open_server(run, arch_file: str | None = None, device: str = "auto") -> ElasticServer:
    """An elastic run folder (router budgets), or a sorted checkpoint (or a run's weights) served
    as the named architectures of `arch_file`, on `device`."""
    where = resolve_device(device)
    if arch_file is None:
        return ElasticServer.from_elastic(load_elastic(run, device=where))
    ckpt = checkpoint_dir(run)
    archs = load_arch_file(arch_file, ModelConfig.from_json(ckpt / "config.json"))
    return ElasticServer.from_checkpoint(ckpt, archs, device=where)


def _think_and_eos(tok) -> tuple[int, int]:
    if tok is None:
        raise ConfigError("budget control needs the model's tokenizer (for </think> and eos)")
    think_end = tok.convert_tokens_to_ids("</think>")
    if think_end is None or think_end == tok.unk_token_id:
        raise ConfigError("the tokenizer has no '</think>' token")
    return think_end, tok.eos_token_id
