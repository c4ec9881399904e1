"""Process-level settings: the compute device, and for CPU runs the C allocator.

glibc returns freed memory above its trim threshold to the OS and serves large tensors with fresh
mmaps, so every multi-megabyte activation pays for page faults on first touch. On a small CPU this
made elementwise ops ~5x slower than the arithmetic needs. `tune_cpu_allocator` raises both
thresholds so freed blocks are reused. It is called by the CLI and the benchmarks (applications),
never on import of the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from star_elastic.config import ConfigError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory for reuse (glibc only). Returns whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(ok_mmap and ok_trim)


def check_device(device: str) -> str:
    """auto, cpu, cuda or cuda:N; anything else is an error naming it."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device `device` names for this process: auto = CUDA where present (the GPU of
    torchrun's LOCAL_RANK), else the CPU."""
    kind = check_device(device).partition(":")[0]
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine; use --device cpu or auto")
    if ":" in device:
        return torch.device(device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
