"""The scheduler in its own process: the model's decode loop never waits for the HTTP layer's GIL.

In one process the asyncio thread (HTTP parsing, JSON, pydantic, tokenizing) and the scheduler's
worker thread take turns on one interpreter lock; with small models most of a decode step is
Python, so every request the HTTP side handles stalls the batch. vLLM splits its API server and
its engine core into two processes for the same reason. Here the `ElasticServer` is handed to a
spawned child by `torch.multiprocessing` (CPU tensors move to shared memory, CUDA tensors go by
IPC handle: the weights are not copied), the child runs the unchanged `Scheduler`, and a pipe
carries jobs in and each scheduler step's events out (one message per step for every job).

`EngineProcess` has the scheduler's interface (`submit`, `cancel`, `active_jobs`, `close`,
`peak_rows`, `dropped`), so `LocalEngine` does not know where the scheduler runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import sys
import threading
import traceback

import torch.multiprocessing as mp

from star_elastic.infer.budget import Job
from star_elastic.serve.scheduler import Scheduler

_SPEC_FIELDS = ("prompt", "answer_budget", "max_tokens", "sampling", "think_budget", "max_think_tokens", "echo",
                "request_id")
START_TIMEOUT_S = 600
WATCH_S = 1.0  # how often the engine process checks that its scheduler thread still runs


@dataclasses.dataclass
class _Status:
    """The child's scheduler counters after its latest step."""

    active: int = 0
    peak_rows: int = 0
    dropped: int = 0


class EngineProcess:
    """Parent-side handle of the scheduler running in a child process."""

    def __init__(self, server, max_batch: int, join_wait: int = 4, threads: int | None = None):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child_conn, server, max_batch, join_wait, threads),
                                 name="star-elastic-engine", daemon=True)
        try:
            self._proc.start()  # pickles the server: CPU weights move to shared memory here
        except (RuntimeError, OSError) as err:
            if "torch_" not in str(err) and "No space left" not in str(err):
                raise
            raise RuntimeError(
                f"could not hand the model to the engine process ({err}). CPU weights are shared through "
                "/dev/shm, which must hold the whole model (in docker: --ipc=host or --shm-size)") from err
        child_conn.close()
        self._send_lock = threading.Lock()
        self._jobs: dict[int, Job] = {}  # submitted, not yet done, failed or cancelled
        self._ids = itertools.count()
        self._status = _Status()
        self._closed = False
        self._failure: str | None = None
        self._await_ready()
        self._reader = threading.Thread(target=self._read, name="star-elastic-engine-reader", daemon=True)
        self._reader.start()

    # --- the scheduler's interface ----------------------------------------------------------
    @property
    def peak_rows(self) -> int:
        return self._status.peak_rows

    @peak_rows.setter
    def peak_rows(self, value: int) -> None:
        self._send(("reset_peak", value))
        self._status.peak_rows = value

    @property
    def dropped(self) -> int:
        return self._status.dropped

    def active_jobs(self) -> int:
        return self._status.active

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def failure(self) -> str | None:
        """Why the engine process cannot take jobs (it exited), or None while it runs."""
        if self._failure is None and not self._proc.is_alive():
            return f"the engine process exited (exit code {self._proc.exitcode}); restart the server"
        return self._failure

    def submit(self, job: Job) -> None:
        if self.failure is not None:
            job.emit([("error", self.failure)])
            return
        key = next(self._ids)
        job.key = key
        self._jobs[key] = job
        try:
            self._send(("submit", key, {name: getattr(job, name) for name in _SPEC_FIELDS}))
        except OSError:  # the child died since `failure` was read; the reader fails the job (or we do)
            if self._jobs.pop(key, None) is not None:
                job.emit([("error", self.failure or "the engine process is gone")])

    def cancel(self, job: Job) -> None:
        job.cancel()
        if job.key is not None and self._jobs.pop(job.key, None) is not None:
            try:
                self._send(("cancel", job.key))
            except OSError:  # the child is gone: nothing left to cancel
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._send(("stop",))
        except OSError:  # the child is already gone
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)
        self._conn.close()

    # --- parent side ------------------------------------------------------------------------
    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _await_ready(self) -> None:
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.terminate()
            raise RuntimeError(f"the engine process did not start within {START_TIMEOUT_S} s")
        try:
            kind, detail = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=10)
            raise RuntimeError(
                f"the engine process exited while starting (exit code {self._proc.exitcode}; its error is above). "
                "It is spawned: a script that starts a server needs the `if __name__ == \"__main__\":` guard") from None
        if kind != "ready":
            self._proc.join(timeout=10)
            raise RuntimeError(f"the engine process failed to start:\n{detail}")

    def _read(self) -> None:
        """Child messages → each job's `emit` (this thread plays the worker thread's part)."""
        while True:
            try:
                events, status = self._conn.recv()
            except (EOFError, OSError):
                break
            self._status = status
            for key, job_events, forced in events:
                job = self._jobs.get(key)
                if job is None:  # cancelled here after the child had stepped it
                    continue
                job.forced_end_of_think = forced
                if _ends(job_events):
                    self._jobs.pop(key, None)
                try:
                    job.emit(job_events)
                except RuntimeError:  # its event loop closed: the client is gone
                    self.cancel(job)
        self._fail_all()

    def _fail_all(self) -> None:
        """The child exited: every pending job ends with an error; later jobs fail at submit."""
        if self._closed:
            return
        self._proc.join(timeout=10)
        self._failure = f"the engine process exited (exit code {self._proc.exitcode}); restart the server"
        self._status = _Status()
        for key in list(self._jobs):
            job = self._jobs.pop(key, None)
            if job is not None:
                try:
                    job.emit([("error", self._failure)])
                except RuntimeError:
                    pass


def _ends(events: list) -> bool:
    """Whether a job's events include its last one ("done" or "error")."""
    return any(kind in ("done", "error") for kind, _ in events)


# --- the child ---------------------------------------------------------------------------------
def _child_main(conn, server, max_batch: int, join_wait: int, threads: int | None) -> None:
    """The engine process: a `Scheduler` over `server`, fed by the parent's messages until "stop" or
    until the parent is gone; the scheduler's worker sends each step's events (`_Outbox.flush`).
    Should the scheduler's thread end otherwise, the process exits (code 70): the parent then fails
    every waiting job and answers 503, where a live process with no scheduler would hang them all."""
    from star_elastic.runtime import tune_cpu_allocator

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    tune_cpu_allocator()  # this process is the server's compute: reuse freed heap (see runtime.py)
    try:
        outbox = _Outbox(conn)
        scheduler = Scheduler(server, max_batch, join_wait=join_wait, threads=threads, after_step=outbox.flush)
        outbox.scheduler = scheduler
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", traceback.format_exc()))
        return
    conn.send(("ready", None))
    jobs: dict[int, Job] = {}
    while True:
        try:
            if not conn.poll(WATCH_S):
                if scheduler.alive:
                    continue
                print("star-elastic engine: the scheduler thread ended; exiting", file=sys.stderr, flush=True)
                os._exit(70)
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if message[0] == "submit":
            _, key, spec = message
            job = Job(emit=None, **spec)
            job.emit = outbox.emitter(key, job, jobs)
            jobs[key] = job
            scheduler.submit(job)
        elif message[0] == "cancel":
            job = jobs.pop(message[1], None)
            if job is not None:
                scheduler.cancel(job)
        elif message[0] == "reset_peak":
            scheduler.peak_rows = message[1]
        else:  # stop
            break
    scheduler.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing left to clean up here (the parent owns the shared weights): skip interpreter teardown


class _Outbox:
    """Events of one scheduler step, sent to the parent in one message after the step."""

    def __init__(self, conn):
        self.conn, self.scheduler = conn, None
        self.events: list[tuple[int, list, bool]] = []
        self.last: _Status | None = None

    def emitter(self, key: int, job: Job, jobs: dict[int, Job]):
        def emit(events: list) -> None:
            self.events.append((key, events, job.forced_end_of_think))
            if _ends(events):
                jobs.pop(key, None)
        return emit

    def flush(self) -> None:
        """Called by the scheduler's worker after each step: send its events, or a changed status."""
        sched = self.scheduler
        status = _Status(sched.active_jobs(), sched.peak_rows, sched.dropped)
        if not self.events and status == self.last:
            return
        events, self.events, self.last = self.events, [], status
        self.conn.send((events, status))
