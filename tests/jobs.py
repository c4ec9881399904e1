"""Starting `star-elastic elastify` as a user does (alone or under torchrun) and watching its processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def elastify_job(cfg: dict, procs: int, root: Path, new_session: bool = False) -> subprocess.Popen:
    """`star-elastic elastify --config` as a user starts it: under torchrun for several processes.
    Output goes to `job.log`; `new_session`: the job leads a process group of its own (to signal it)."""
    yaml_path = root / f"{Path(cfg['out']).name}-{procs}.yaml"
    yaml_path.write_text(yaml.safe_dump(cfg))
    launcher = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port())]
    with open(yaml_path.with_suffix(".log"), "w") as log:  # a file: a full pipe would stall the job
        job = subprocess.Popen(launcher + ["-m", "star_elastic.cli", "elastify", "--config", str(yaml_path)],
                               env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=new_session)
    job.log = yaml_path.with_suffix(".log")
    return job


def descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return children + [d for c in children for d in descendants(c)]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie whose threads have all ended (a zombie leader's other
    threads may still be exiting, holding its open files and locks)."""
    try:
        zombie = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # state after "(comm)"
        return not zombie or len(list(Path(f"/proc/{pid}/task").iterdir())) > 1
    except FileNotFoundError:
        return False
