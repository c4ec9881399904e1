"""Resident memory of serving every trained budget vs serving the parent alone, in one run.

    .venv/bin/python benchmarks/bench_serving_memory.py [RUN]

Loads an elastic run (default: demo_out/run, else a random demo-sized model), measures the
process's resident set after loading the parent and after building and running the submodel of
every budget (views of the parent's tensors), and, for contrast, after materialising the same
submodels as sliced copies. Also counts the weight bytes the served submodels own themselves.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

from star_elastic.elastic.arch import slice_model
from star_elastic.elastic.run import load_elastic
from star_elastic.infer.views import view_model
from star_elastic.runtime import tune_cpu_allocator


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    tune_cpu_allocator()
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out/run")
    if not (run / "run.json").is_file():
        sys.exit(f"{run}: no elastic run; run `make demo` first or pass a run folder")
    elastic = load_elastic(run)
    parent = elastic.model
    ids = torch.randint(3, parent.config.vocab_size, (4, 64))
    weight_bytes = sum(p.numel() * p.element_size() for p in parent.parameters())
    with torch.inference_mode():
        parent(ids)
    gc.collect()
    base = rss_bytes()
    storages = {p.untyped_storage().data_ptr() for p in parent.parameters()}
    views, owned = [], 0
    with torch.inference_mode():
        for b in elastic.ecfg.budgets:
            v = view_model(parent, elastic.architecture(b))
            v(ids)
            owned += sum(p.numel() * p.element_size() for p in v.parameters()
                         if p.untyped_storage().data_ptr() not in storages)
            views.append(v)
    gc.collect()
    with_views = rss_bytes()
    with torch.inference_mode():
        copies = [slice_model(parent, elastic.architecture(b)) for b in elastic.ecfg.budgets if b != 1.0]
        for c in copies:
            c(ids)
    gc.collect()
    with_copies = rss_bytes()
    copy_bytes = sum(p.numel() * p.element_size() for c in copies for p in c.parameters())
    print(f"parent weights: {weight_bytes:,} bytes; process RSS after loading it: {base:,}")
    print(f"serving all {len(views)} budgets as views: weights ({weight_bytes + owned:,}) / parent ({weight_bytes:,}) "
          f"= {(weight_bytes + owned) / weight_bytes:.4f}; RSS {with_views:,} / {base:,} = {with_views / base:.4f}")
    print(f"for contrast, sliced copies of the smaller budgets: weights "
          f"{(weight_bytes + owned + copy_bytes) / weight_bytes:.3f}x; RSS {with_copies / base:.4f}x")


if __name__ == "__main__":
    main()
