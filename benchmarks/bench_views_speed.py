"""Decode speed of every trained budget served as views of the parent vs as contiguous slices.

    .venv/bin/python benchmarks/bench_views_speed.py RUN [--batch 300] [--rounds 3]

Views (`infer.views.view_model`) share the parent's storage: strided narrows and SegmentedLinear
(several matmuls per projection whose kept rows form several runs). Slices
(`slicing.slice_model`) are contiguous copies. Both are built from the same `IndexSets`, so they
compute the same outputs; this measures what the views cost in decode speed. Each round measures
every (budget, kind) in turn, so a slow spell of a shared machine does not land on one only; the
median of the rounds is printed with speedup × active ratio (1 = in proportion to the parameters).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from star_elastic.accounting import count_params
from star_elastic.elastic.run import load_elastic
from star_elastic.infer.evaluate import decode_speed
from star_elastic.infer.views import view_model
from star_elastic.slicing import slice_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--batch", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    elastic = load_elastic(args.run)
    full = count_params(elastic.config).active_params
    models = {}
    for b in elastic.ecfg.budgets:
        arch = elastic.architecture(b)
        models[(b, "views")] = view_model(elastic.model, arch)
        models[(b, "slices")] = slice_model(elastic.model, arch)
    speeds = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            speeds[key].append(decode_speed(model, batch=args.batch, repeats=1))
    median = {key: sorted(v)[len(v) // 2] for key, v in speeds.items()}
    print(f"decode tok/s at batch {args.batch}, median of {args.rounds} rounds")
    print("budget  active  views tok/s  slices tok/s  slices/views  views speedup×ratio  slices speedup×ratio")
    for b in elastic.ecfg.budgets:
        ratio = count_params(models[(b, "slices")].config).active_params / full
        v, s = median[(b, "views")], median[(b, "slices")]
        print(f"{b:<7g} {ratio:6.3f}  {v:11.0f}  {s:12.0f}  {s / v:12.2f}  "
              f"{v / median[(1.0, 'views')] * ratio:19.2f}  {s / median[(1.0, 'slices')] * ratio:20.2f}")


if __name__ == "__main__":
    main()
