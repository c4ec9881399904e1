"""One MoE layer, forward + backward: grouped GEMM (`torch._grouped_mm`) ÷ the per-expert loop.

    .venv/bin/python benchmarks/bench_moe_grouped.py [--tokens 2048] [--device cpu|cuda] [--dtype fp32|bf16]

Same weights, same tokens, the two paths alternate so machine noise hits both alike; prints the
median seconds of each and the ratio, and the largest output difference between them (absolute,
and relative: the difference's norm over the loop output's). `make gpu-check` runs it in bf16 on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from star_elastic.config import ModelConfig
from star_elastic.model.moe import MoE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = ModelConfig(hidden_size=args.hidden, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
                      moe_intermediate_size=args.inter, moe_shared_expert_intermediate_size=args.inter)
    torch.manual_seed(0)
    moe = MoE(cfg).to(args.device, dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype)
    grad = torch.randn_like(x)
    times, outs = {True: [], False: []}, {}
    for _ in range(args.repeats):
        for grouped in (True, False):
            moe.experts.grouped = grouped
            moe.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = moe(x)
            y.backward(grad)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[grouped].append(time.perf_counter() - t0)
            outs[grouped] = y.detach().float()
    g, loop = statistics.median(times[True]), statistics.median(times[False])
    diff = outs[True] - outs[False]
    moe.experts.grouped = None  # what the model itself would run: grouped where it runs
    print(json.dumps({"device": args.device, "dtype": args.dtype, "tokens": args.tokens, "experts": args.experts,
                      "top_k": args.top_k, "grouped_used": moe.experts._use_grouped(x),
                      "grouped_s": round(g, 5), "loop_s": round(loop, 5), "ratio_grouped_over_loop": round(g / loop, 3),
                      "max_abs_diff": float(diff.abs().max()), "rel_diff": float(diff.norm() / outs[False].norm())},
                     indent=2))


if __name__ == "__main__":
    main()
