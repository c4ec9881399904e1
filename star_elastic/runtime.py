"""Process-level settings for CPU runs: thread count and the C allocator.

glibc returns freed memory above its trim threshold to the OS and serves large tensors with fresh
mmaps, so every multi-megabyte activation pays for page faults on first touch. On a small CPU this
made elementwise ops ~5x slower than the arithmetic needs. `tune_cpu_allocator` raises both
thresholds so freed blocks are reused. It is called by the CLI and the benchmarks (applications),
never on import of the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

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
