"""Per-rank peak memory of loading the parent for elastify: meta-device loading (each rank fills
its FSDP2 shards from the safetensors files one tensor at a time, sorted as it streams) ÷ full
loading (each rank loads the whole parent and sorts it, then shards), FSDP2 over 2 processes on
CPU with gloo, the random 111M-parameter parent of bench_fsdp_memory.py. One run prints both.

    .venv/bin/python benchmarks/bench_meta_load.py [--out /tmp/bench_meta_load]

"Loading" is everything from `train` starting to the engine being ready: parent load, importance
on the calibration batches (a forward of the parent), sorting, sharding of teacher and student;
not the untrained run folder's save that follows (gathered on rank 0 in both modes).
The figure is the peak resident size in that window minus the resident size before `train`
(sampled every 20 ms, large tensors served by mmap so freed memory leaves the process).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_fsdp_memory import RUN, make_parent, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench_meta_load")
    args = ap.parse_args()
    out = Path(args.out)
    parent = make_parent(out)
    cfg = RUN | {"model": str(parent), "parallel": "fsdp", "steps": 1}
    full = run(cfg | {"out": str(out / "run_full"), "load": "full"}, 2, out / "r_full")
    meta = run(cfg | {"out": str(out / "run_meta"), "load": "meta"}, 2, out / "r_meta")
    gib = 2**30
    full_peak, meta_peak = max(r["load_growth"] for r in full), max(r["load_growth"] for r in meta)
    print(json.dumps({
        "full_load_per_rank_GiB": [round(r["load_growth"] / gib, 3) for r in full],
        "meta_load_per_rank_GiB": [round(r["load_growth"] / gib, 3) for r in meta],
        "ratio_meta_over_full": round(meta_peak / full_peak, 3),
        "parent_fp32_GiB": round((parent / "model.safetensors").stat().st_size / gib, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
