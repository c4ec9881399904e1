"""gpu-check's torchrun target: `star-elastic elastify ARGS` in this process, then this rank's peak memory.

    torchrun --nproc-per-node N checks/elastify_worker.py PEAKS_DIR elastify ARGS...

Writes PEAKS_DIR/peak_rank{R}.json: {"rank", "exit", "peak_bytes"} (torch.cuda.max_memory_allocated
over the whole command on this rank's device; null on the CPU). Exits with the command's status.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from star_elastic.cli import main


def run(peaks: Path, argv: list[str]) -> int:
    code = main(argv)
    rank = int(os.environ.get("RANK", "0"))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    (peaks / f"peak_rank{rank}.json").write_text(json.dumps({"rank": rank, "exit": code, "peak_bytes": peak}))
    return code


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
