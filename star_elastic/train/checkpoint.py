"""Atomic, sharded training checkpoints with torch.distributed.checkpoint (DCP; no pickle).

Layout: RUN/checkpoints/step-000050/ (DCP shards of model + optimizer state, one file per rank,
plus .metadata) and state.json, and RUN/checkpoints/latest naming the newest complete one. Every
rank writes its shards into a temporary folder; rank 0 renames it only when all are done, then
replaces `latest` atomically, so a crash mid-save leaves the previous checkpoint intact and
`latest` pointing at it. DCP stores tensors by fully qualified name with their global shapes, so
a checkpoint written by N processes loads into M (resharded on load); one process needs no
process group.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from star_elastic.config import ConfigError


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _single_process_quiet():
    """DCP warns on every save/load without a process group; one process is a supported mode here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    extra: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it with its (sharded) model and optimizer."""
    name = f"step-{step:06d}"
    tmp, final = ckpt_dir / f".{name}.tmp", ckpt_dir / name
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, opt_state = get_state_dict(model, opt)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": opt_state}, checkpoint_id=str(tmp),
                 no_dist=not dist.is_initialized())
    if _is_rank0():
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = ckpt_dir / ".latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, ckpt_dir / "latest")
        for old in sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    if not (path / "state.json").is_file() or not (path / ".metadata").is_file():
        raise ConfigError(f"{pointer}: names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Load model and optimizer state in place (collective, any world size); returns state.json."""
    model_state, opt_state = get_state_dict(model, opt)
    state = {"model": model_state, "optimizer": opt_state}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: checkpoint does not match this model and optimizer ({first})") from None
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads((path / "state.json").read_text())
