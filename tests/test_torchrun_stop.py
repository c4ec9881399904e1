"""Stopping torchrun stops its workers, and one torchrun job is refused as a whole.

`python -m torch.distributed.run --nproc-per-node 2 -m star_elastic.cli elastify` on a tiny parent,
stopped mid-training by SIGKILL of the torchrun process (which forwards nothing) or SIGTERM of its
process group (the workers run in sessions of their own, so only torchrun gets it): every worker
ends (distributed/launcher.py), the run folder's lock is stale or released, and a new run takes the
folder over. With
the lock held elsewhere, rank 0 is refused and both ranks fail with the same one-line error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from jobs import alive, descendants, elastify_job
from test_elastify import save_tiny_parent

from star_elastic.config import from_dict
from star_elastic.train.elastify import ElastifyConfig, train
from star_elastic.train.runfolder import LOCK, WriterLock

CFG = dict(data="synthetic", steps=100_000, batch_size=4, n_synthetic=100, calibration_batches=2, router_fit_steps=10,
           stage1_seq_len=16, stage2_seq_len=24, checkpoint_every=10**6)
WAIT_S = 300  # bounds on waiting for a slow machine, not timings


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return save_tiny_parent(tmp_path_factory.mktemp("parent"))


def wait_until(done, what: str, job=None, limit: float = WAIT_S) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert job is None or job.poll() is None, f"the job ended before {what}: ...{job.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {limit} s"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", ["sigkill-torchrun", "sigterm-group"])
def test_stopping_torchrun_ends_every_worker_and_frees_the_run(parent, tmp_path, stop):
    run = tmp_path / "run"
    cfg = CFG | {"model": str(parent), "out": str(run)}
    job = elastify_job(cfg, 2, tmp_path, new_session=True)
    workers = []
    try:
        metrics = run / "metrics.jsonl"
        wait_until(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, "training steps", job)
        workers = descendants(job.pid)
        assert len(workers) == 2, workers
        if stop == "sigkill-torchrun":
            os.kill(job.pid, signal.SIGKILL)
        else:
            os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=WAIT_S)
        t0 = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in workers), "end of the workers", limit=30)
        print(f"{stop}: workers gone {time.monotonic() - t0:.2f} s after torchrun ended")
    finally:
        for pid in [job.pid, *workers]:  # never leave a worker behind, whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    steps = metrics.read_text().count("\n")
    # rank 0 ended holding the lock (its file names it), or, failing in a collective as its peer
    # ended, released it on the way out (no file)
    stale = (run / LOCK).is_file()
    assert not stale or json.loads((run / LOCK).read_text())["pid"] in workers
    notes = []
    summary = train(from_dict(ElastifyConfig, cfg | {"resume": "auto", "stop_after": steps + 1}), log=notes.append)
    taken = [n for n in notes if f"{run / LOCK}: taking over from pid" in n]
    assert len(taken) == stale and all(int(n.split("from pid ")[1].split()[0]) in workers for n in taken), notes
    assert f"resume auto: {run} has no checkpoint; starting the run again" in notes
    assert not summary["finished"] and not (run / LOCK).exists()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, steps + 2))


def test_a_refused_rank_0_fails_every_rank_in_one_line(parent, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = WriterLock.acquire(run, print)
    try:
        job = elastify_job(CFG | {"model": str(parent), "out": str(run), "steps": 2}, 2, tmp_path)
        assert job.wait(timeout=WAIT_S) != 0
    finally:
        lock.release()
    log = job.log.read_text()
    # rank 0's refusal, and rank 1 failing with it; the two ranks write to one log at once, so their
    # lines may interleave: count the messages, not the lines
    head = f"star-elastic elastify: error: {run}: another elastify is writing this run folder (pid {os.getpid()} on "
    assert log.count("another elastify is writing this run folder") == log.count(head) == 2, log
    # no traceback from the workers (torchrun prints its own summary of the failed workers)
    assert not [line for line in log.splitlines() if line.startswith("  File") and "star_elastic" in line], log
    assert list(Path(run).iterdir()) == []  # nothing written
