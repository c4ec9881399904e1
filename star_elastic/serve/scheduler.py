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
("done", reason) or ("error", message).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict, deque
from collections.abc import Callable

import torch

from star_elastic.infer.generate import DecodeBatch, GenerationConfig, Row, seeded_generator


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
    cancelled: bool = False
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
                self._admit()
            self._drop_cancelled()
            self._join_waiting()
            for budget, batch in list(self._batches.items()):
                if batch.rows:
                    self._guarded(budget, lambda: self._finished(batch.step()))
            self._steps += 1
            self._emit()
            if self.after_step is not None:
                self.after_step()

    def _admit(self) -> None:
        """Move queued jobs into their first phase while slots are free (lock held)."""
        while self._incoming and len(self._active) < self.max_batch:
            job = self._incoming.popleft()
            if job.cancelled:
                continue
            self._active.add(job)
            gen = seeded_generator(job.sampling.seed, self.server.model(job.answer_budget).device)
            if job.think_budget is None:
                row = Row(job.prompt, dataclasses.replace(job.sampling, max_new_tokens=job.max_tokens,
                                                          stop_token_ids=(self.server.eos_id,)), gen)
                job.answer = row
                self._enqueue(job, row, job.answer_budget, "answer")
            else:
                job.think = self.server.think_row(job.prompt, job.max_think_tokens, job.sampling, gen)
                self._enqueue(job, job.think, job.think_budget, "think")

    def _enqueue(self, job: Job, row: Row, budget: float, phase: str) -> None:
        row.on_token = lambda tok: self._tell(job, (phase, tok))
        self._jobs[id(row)] = job
        self._joining[budget].append(row)
        self._waiting_since.setdefault(budget, self._steps)

    def _tell(self, job: Job, event: tuple[str, object]) -> None:
        job.events.append(event)
        self._told[job] = None

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
                                                            continuation=self._continue)
            self._guarded(budget, lambda: batch.join(rows), rows)
            self._finished([r for r in rows if r.finish is not None])
        self.peak_rows = max(self.peak_rows, sum(len(b.rows) for b in self._batches.values()))

    def _continue(self, row: Row) -> Row | None:
        """A trace that ends in its own answer budget's batch: the answer continues its cache there
        (called inside `DecodeBatch.step`; the think row then reaches `_finished` unmapped)."""
        job = self._jobs.get(id(row))
        if job is None or job.cancelled or row is not job.think or job.think_budget != job.answer_budget:
            return None
        done = self.server.answer_in_place(row, job.max_tokens, job.sampling)
        if done is None:  # an empty answer goes the prefill way (`_finished`), as in generate
            return None
        job.forced_end_of_think, answer = done
        job.answer = answer
        del self._jobs[id(row)]
        self._jobs[id(answer)] = job
        answer.on_token = lambda tok: self._tell(job, ("answer", tok))
        return answer

    def _finished(self, rows: list[Row]) -> None:
        for row in rows:
            job = self._jobs.pop(id(row), None)
            if job is None or job.cancelled:
                continue
            if row is job.think:
                job.forced_end_of_think = self.server.close_trace(row)
                job.answer = self.server.answer_row(row, job.max_tokens, job.sampling)
                self._enqueue(job, job.answer, job.answer_budget, "answer")
            else:
                self._release(job)
                self._tell(job, ("done", row.finish))

    def _release(self, job: Job) -> None:
        with self._lock:
            self._active.discard(job)

    def _drop_cancelled(self) -> None:
        gone = [job for job in list(self._active) if job.cancelled]
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
        self.dropped += len(gone)

    def _guarded(self, budget: float, work: Callable[[], None], rows: list[Row] | None = None) -> None:
        """Run one step or join; on failure end the affected jobs with an error, keep serving."""
        try:
            work()
        except Exception as err:  # noqa: BLE001 - one bad batch must not stop the server
            batch = self._batches.pop(budget, None)
            failed = list(rows or []) + (batch.rows if batch is not None else [])
            for row in failed:
                job = self._jobs.pop(id(row), None)
                if job is not None:
                    self._release(job)
                    self._tell(job, ("error", f"generation failed: {type(err).__name__}: {err}"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
