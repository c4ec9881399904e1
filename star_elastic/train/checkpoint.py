"""Atomic training checkpoints in safetensors (no pickle): weights, optimizer state, counters.

Layout: RUN/checkpoints/step-000050/{weights,optimizer}.safetensors + state.json, and
RUN/checkpoints/latest naming the newest complete one. A checkpoint is written under a temporary
name and renamed only when complete, and `latest` is replaced atomically afterwards, so a crash
mid-save leaves the previous checkpoint intact and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from star_elastic.config import ConfigError


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, st in state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[name] = value
    return tensors, scalars


def save_checkpoint(ckpt_dir: Path, step: int, weights: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                    extra: dict, keep: int = 2) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = ckpt_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    opt_tensors, opt_scalars = _optimizer_tensors(opt)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_scalars, **extra}))
    final = ckpt_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = ckpt_dir / ".latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, ckpt_dir / "latest")
    for old in sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise ConfigError(f"{pointer}: names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path: Path, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and state.json of a checkpoint; the optimizer state is loaded into `opt`."""
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "weights.safetensors"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    scalars = state["optimizer"]
    opt_state: dict = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    for pid, st in scalars["state"].items():
        opt_state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": opt_state, "param_groups": scalars["param_groups"]})
    return weights, state
