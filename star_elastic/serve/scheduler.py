"""Continuous batching over every budget's view of the one set of elastic weights.

One worker thread owns the model (in the server's engine process: serve/worker.py) and drives the
two-phase flow that `ElasticServer.generate` drives too (`star_elastic.infer.budget.TwoPhaseFlow`:
a `DecodeBatch` per budget, batched prefills of the rows waiting to join, a trace's answer
continuing its cache in place or queued for the answer budget). Between steps the worker admits
new jobs (at most `max_batch` at once over every budget), drops cancelled and failed ones, then
steps every budget's batch once, back to back.

Events reach the asyncio side through `Job.emit`, once per step with that step's list of events
(one cross-thread wake-up per job and step, not per token; their kinds: `Job`).

Failures stay with their request: the flow ends a job whose own work raised with an "error" event
(logged here with its request id) and its rows leave their batch as a cancelled job's do, so the
other rows' outputs do not change. Any other exception in the loop fails the jobs in flight and the
loop goes on with the next ones.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import torch

from star_elastic.infer.budget import Job, TwoPhaseFlow

log = logging.getLogger("star_elastic.serve")


class Scheduler:
    """Owns the worker thread; `submit` and `cancel` are thread-safe and return at once.
    `after_step` (optional) is called by the worker after each step's events are emitted."""

    def __init__(self, server, max_batch: int = 32, join_wait: int = 4, threads: int | None = None,
                 after_step: Callable[[], None] | None = None):
        self.server, self.max_batch, self.threads = server, max_batch, threads
        self.after_step = after_step
        self.flow = TwoPhaseFlow(server, join_wait)
        self._lock = threading.Condition()
        self._incoming: deque[Job] = deque()
        self._active: set[Job] = set()
        self._stopping = False
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

    @property
    def peak_rows(self) -> int:
        """Most rows decoding at once over all budgets (a measure of batching)."""
        return self.flow.peak_rows

    @peak_rows.setter
    def peak_rows(self, value: int) -> None:
        self.flow.peak_rows = value

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it ends only on `close`)."""
        return self._thread.is_alive()

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
                    self.flow.start(job)
                self._drop_gone()
                self.flow.advance()
            except Exception as err:  # noqa: BLE001 - a bug here must not stop the server
                self._fail_in_flight(err)
            self._release_done()
            self._emit()
            if self.after_step is not None:
                self.after_step()

    def _admit(self) -> list[Job]:
        """Take queued jobs while slots are free (lock held)."""
        admitted = []
        while self._incoming and len(self._active) < self.max_batch:
            job = self._incoming.popleft()
            if not job.cancelled:
                self._active.add(job)
                admitted.append(job)
        return admitted

    def _drop_gone(self) -> None:
        """Rows of cancelled and failed jobs leave their batches; their slots free up."""
        gone = [job for job in list(self._active) if job.cancelled or job.failed]
        if not gone:
            return
        self.flow.drop(gone)
        with self._lock:
            self._active.difference_update(gone)
        self.dropped += sum(job.cancelled for job in gone)

    def _release_done(self) -> None:
        with self._lock:
            self._active = {job for job in self._active if job.finish is None}

    def _fail_in_flight(self, err: Exception) -> None:
        """The loop itself raised: every admitted job fails and frees its slot, the batches start afresh."""
        with self._lock:
            jobs, self._active = list(self._active), set()
        for job in jobs:
            self.flow.fail(job, err)
        self.flow.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _emit(self) -> None:
        """Hand each job the events of this step in one call; log each failure with its request id."""
        for job, events in self.flow.drain():
            if job.error is not None and any(kind == "error" for kind, _ in events):
                log.error("request %s failed", job.request_id or "(no id)", exc_info=job.error)
            if job.cancelled:
                continue
            try:
                job.emit(events)
            except RuntimeError:  # its event loop closed after the check above: the client is gone
                job.cancel()
