"""Decode speed of every trained budget served as views of the parent vs as contiguous slices.

    .venv/bin/python benchmarks/bench_views_speed.py RUN [--batch 300] [--rounds 3]

Views (`infer.views.view_model`) share the parent's storage: strided narrows and SegmentedLinear
(several matmuls per projection whose kept rows form several runs). Slices
(`slicing.slice_model`) are contiguous copies. Both are built from the same `IndexSets`, so they
compute the same outputs; this measures what the views cost in decode speed. Each round measures
every (budget, kind) in turn, so a slow spell of a shared machine does not land on one only; the
median of the rounds is printed with speedup × active ratio (1 = in proportion to the parameters),
and the FLOPs of one decode step (torch's FlopCounterMode; machine-independent) relative to the
parent's: the most a budget can gain where matmuls dominate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from star_elastic.accounting import count_params
from star_elastic.elastic.arch import slice_model
from star_elastic.elastic.run import load_elastic
from star_elastic.infer.evaluate import decode_speed
from star_elastic.infer.generate import GenerationConfig, generate
from star_elastic.infer.views import view_model


@torch.inference_mode()
def decode_flops(model, batch: int, prompt_len: int = 32) -> float:
    """FLOPs of one cached decode step at `batch` (3 new tokens minus 1: prefill excluded)."""
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    totals = []
    for n in (1, 3):
        counter = FlopCounterMode(display=False)
        with counter:
            generate(model, prompts.tolist(), GenerationConfig(max_new_tokens=n))
        totals.append(counter.get_total_flops())
    return (totals[1] - totals[0]) / 2


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
    print("budget  active  FLOPs/step ratio  views tok/s  slices tok/s  slices/views  views speedup×ratio  "
          "slices speedup×ratio")
    parent_flops = decode_flops(models[(1.0, "slices")], args.batch)
    for b in elastic.ecfg.budgets:
        ratio = count_params(models[(b, "slices")].config).active_params / full
        v, s = median[(b, "views")], median[(b, "slices")]
        flops = decode_flops(models[(b, "slices")], args.batch) / parent_flops
        print(f"{b:<7g} {ratio:6.3f}  {flops:16.3f}  {v:11.0f}  {s:12.0f}  {s / v:12.2f}  "
              f"{v / median[(1.0, 'views')] * ratio:19.2f}  {s / median[(1.0, 'slices')] * ratio:20.2f}")


if __name__ == "__main__":
    main()
