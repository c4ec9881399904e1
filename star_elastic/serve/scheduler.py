"""Continuous batching over every budget's view of the one set of elastic weights.

One worker thread owns the model (in the server's engine process: serve/worker.py). Between
decode steps it admits new jobs (a batched prefill per budget, the rows stacked onto that budget's
running `DecodeBatch`), drops cancelled ones, then steps every budget's batch once, back to back:
each budget's view decodes its own sub-batch.
A prefill costs several decode steps whatever its batch (per-op overhead dominates small models),
so rows waiting to join a budget that is already decoding are prefilled together: once they
are as many as its running rows, or the oldest has waited `join_wait` steps. A two-phase
job leaves the think budget's batch when its trace ends and joins the answer budget's batch at
the next step boundary; when both budgets are the same, its answer row takes the trace's place
and cache in the batch instead (no second prefill). Both exactly as `ElasticServer.generate` runs
them (same `think_row`, `close_trace`, `answer_row` / `answer_in_place`, same `DecodeBatch.step`).
Rows never influence each other, so a greedy job's tokens are the same alone or under load.

Events reach the asyncio side through `Job.emit`, once per step with that step's list of events
(one cross-thread wake-up per job and step, not per token): ("think", id), ("answer", id),
("done", reason) or ("error", message); for a job that asks for log-probabilities each token event
is followed by ("logprob", Logprob or None) (None: a `</think>` forced at the cap, not sampled), and
an echoed prompt's scores come as ("prompt_logprobs", [None, Logprob, ...]).

Failures stay with their request. A job's own work (its generator and rows, the step from trace to
answer, its sampling and log-probabilities inside a step: `DecodeBatch(isolate_rows=True)`) runs
guarded per job: an exception ends that job with an "error" event, logged with its request id, and
its rows leave their batch as a cancelled job's do, so the other rows' outputs do not change. A
failed prefill fails only the rows it was joining; a failed decode forward fails every job of that
budget's batch (its cache is then in an unknown state) and the batch is rebuilt by later jobs. Any
other exception in the loop fails the jobs in flight and the loop goes on with the next ones.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable

import torch

from star_elastic.infer.generate import DecodeBatch, GenerationConfig, Row, seeded_generator

log = logging.getLogger("star_elastic.serve")


@dataclasses.dataclass(eq=False)
class Job:
    """One sequence of a request. `think_budget` None means a single phase on `answer_budget`."""

    prompt: list[int]
    answer_budget: float
    max_tokens: int
    sampling: GenerationConfig
    emit: Callable[[list[tuple[str, object]]], None]  # called from the worker thread
    think_budget: float | None = None
    max_think_tokens: int = 0
    echo: bool = False
    """Score the prompt (with `sampling.logprobs` set): on the answer budget's model, by the first
    prefill of it that covers the prompt."""
    request_id: str = ""
    """The HTTP request's id, for the log and the error message."""
    cancelled: bool = False
    failed: bool = False
    think: Row | None = None
    answer: Row | None = None
    forced_end_of_think: bool = False
    key: int | None = None  # its id between the HTTP process and the engine process (serve/worker.py)
    events: list[tuple[str, object]] = dataclasses.field(default_factory=list)  # this step's, not yet emitted

    def cancel(self) -> None:
        self.cancelled = True  # read by the worker at the next step boundary


class Scheduler:
    """Owns the worker thread; `submit` and `cancel` are thread-safe and return at once.
    `after_step` (optional) is called by the worker after each step's events are emitted."""

    def __init__(self, server, max_batch: int = 32, join_wait: int = 4, threads: int | None = None,
                 after_step: Callable[[], None] | None = None):
        self.server, self.max_batch, self.join_wait, self.threads = server, max_batch, join_wait, threads
        self.after_step = after_step
        self._lock = threading.Condition()
        self._incoming: deque[Job] = deque()
        self._batches: dict[float, DecodeBatch] = {}
        self._joining: dict[float, list[Row]] = defaultdict(list)
        self._waiting_since: dict[float, int] = {}  # budget -> step its oldest waiting row arrived
        self._steps = 0
        self._told: dict[Job, None] = {}  # jobs with events to emit after this step (insertion-ordered)
        self._jobs: dict[int, Job] = {}  # id(row) -> job, for rows in a batch or about to join
        self._active: set[Job] = set()
        self._stopping = False
        self.peak_rows = 0  # most rows decoding at once over all budgets (a measure of batching)
        self.dropped = 0  # jobs cancelled before they finished (clients gone)
        self._thread = threading.Thread(target=self._run, name="star-elastic-scheduler", daemon=True)
        self._thread.start()

    # --- called from any thread -------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._lock:
            self._incoming.append(job)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        job.cancel()

    def active_jobs(self) -> int:
        """Jobs holding a batch slot (admitted, not yet finished or dropped)."""
        with self._lock:
            return len(self._active)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30)

    # --- the worker -------------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # in this thread: OpenMP's thread count is per thread
        while True:
            with self._lock:
                while not self._stopping and not self._incoming and not self._active:
                    self._lock.wait()
                if self._stopping:
                    return
                admitted = self._admit()
            try:
                for job in admitted:
                    self._per_job(job, self._start, job)
                self._drop_gone()
                self._join_waiting()
                for budget, batch in list(self._batches.items()):
                    if batch.rows:
                        self._step(budget, batch)
            except Exception as err:  # noqa: BLE001 - a bug here must not stop the server
                self._fail_in_flight(err)
            self._steps += 1
            self._emit()
            if self.after_step is not None:
                self.after_step()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it ends only on `close`)."""
        return self._thread.is_alive()

    def _admit(self) -> list[Job]:
        """Take queued jobs while slots are free (lock held)."""
        admitted = []
        while self._incoming and len(self._active) < self.max_batch:
            job = self._incoming.popleft()
            if not job.cancelled:
                self._active.add(job)
                admitted.append(job)
        return admitted

    def _start(self, job: Job) -> None:
        """The job's first phase: its generator and first row, queued to join its budget's batch."""
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

    def _enqueue(self, job: Job, row: Row, budget: float, phase: str) -> None:
        row.on_token = lambda tok: self._tell_token(job, row, phase, tok)
        self._jobs[id(row)] = job
        self._joining[budget].append(row)
        self._waiting_since.setdefault(budget, self._steps)

    def _tell(self, job: Job, event: tuple[str, object]) -> None:
        if job.failed:
            return
        job.events.append(event)
        self._told[job] = None

    def _tell_token(self, job: Job, row: Row, phase: str, tok: int) -> None:
        self._tell(job, (phase, tok))
        if row.cfg.logprobs is not None:  # a token appended without sampling (a forced </think>) has none
            sampled = len(row.token_logprobs) == len(row.tokens)
            self._tell(job, ("logprob", row.token_logprobs[-1] if sampled else None))

    # --- failures ---------------------------------------------------------------------------
    def _per_job(self, job: Job, work: Callable, *args) -> None:
        """Run one job's own work; an exception fails that job only."""
        try:
            work(*args)
        except Exception as err:  # noqa: BLE001 - one request's failure is that request's
            self._fail(job, err)

    def _fail(self, job: Job, err: BaseException) -> None:
        """End `job` with an error event (logged with its request id); its rows leave at `_drop_gone`."""
        if job.failed or job.cancelled:
            return
        log.error("request %s failed", job.request_id or "(no id)", exc_info=err)
        self._tell(job, ("error", f"generation failed (request {job.request_id or 'without id'}): "
                                  f"{type(err).__name__}: {err}"))
        job.failed = True

    def _fail_in_flight(self, err: Exception) -> None:
        """The loop itself raised: every admitted job fails and frees its slot, the batches start afresh."""
        with self._lock:
            jobs, self._active = list(self._active), set()
        for job in jobs:
            self._fail(job, err)
        self._batches.clear()
        self._joining.clear()
        self._waiting_since.clear()
        self._jobs.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _emit(self) -> None:
        """Hand each job the events of this step in one call."""
        for job in self._told:
            events, job.events = job.events, []
            if job.cancelled:
                continue
            try:
                job.emit(events)
            except RuntimeError:  # its event loop closed after the check above: the client is gone
                job.cancel()
        self._told.clear()

    def _due(self, budget: float, waiting: int) -> bool:
        """Prefill now, or let more rows gather for one batched prefill."""
        batch = self._batches.get(budget)
        running = len(batch.rows) if batch is not None else 0
        waited = self._steps - self._waiting_since[budget]
        return waiting >= running or waited >= self.join_wait

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

    def _step(self, budget: float, batch: DecodeBatch) -> None:
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

    def _fail_rows(self, rows: list[Row], err: Exception) -> None:
        for row in rows:
            job = self._jobs.pop(id(row), None)
            if job is not None:
                self._fail(job, err)

    def _continue(self, row: Row) -> Row | None:
        """A trace that ends in its own answer budget's batch: the answer continues its cache there
        (called inside `DecodeBatch.step`; the think row then reaches `_finished` unmapped)."""
        job = self._jobs.get(id(row))
        if job is None or job.cancelled or job.failed or row is not job.think or job.think_budget != job.answer_budget:
            return None
        done = self.server.answer_in_place(row, job.max_tokens, job.sampling)
        if done is None:  # an empty answer goes the prefill way (`_finished`), as in generate
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
                self._fail(job, row.error)
            elif row is job.think:
                self._per_job(job, self._answer_phase, job, row)
            else:
                self._release(job)
                self._tell(job, ("done", row.finish))

    def _answer_phase(self, job: Job, think: Row) -> None:
        """A trace that left its batch: close it, queue the answer (re-prefilled by the answer budget)."""
        job.forced_end_of_think = self.server.close_trace(think)
        job.answer = self.server.answer_row(think, job.max_tokens, job.sampling)
        if job.echo and job.sampling.logprobs is not None and job.think_budget != job.answer_budget:
            job.answer.score_prompt = len(job.prompt)  # its prefill of prompt + trace covers the prompt
        self._enqueue(job, job.answer, job.answer_budget, "answer")

    def _release(self, job: Job) -> None:
        with self._lock:
            self._active.discard(job)

    def _drop_gone(self) -> None:
        """Rows of cancelled and failed jobs leave their batches; their slots free up."""
        gone = [job for job in list(self._active) if job.cancelled or job.failed]
        if not gone:
            return
        rows = {id(r) for job in gone for r in (job.think, job.answer) if r is not None}
        for batch in self._batches.values():
            batch.leave([r for r in batch.rows if id(r) in rows])
        for budget in self._joining:
            self._joining[budget] = [r for r in self._joining[budget] if id(r) not in rows]
            if not self._joining[budget]:
                self._waiting_since.pop(budget, None)
        for key in rows:
            self._jobs.pop(key, None)
        for job in gone:
            self._release(job)
        self.dropped += sum(job.cancelled for job in gone)
