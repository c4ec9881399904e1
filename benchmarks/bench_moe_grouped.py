"""One MoE layer, forward + backward: grouped GEMM (`torch._grouped_mm`) ÷ the per-expert loop.

    .venv/bin/python benchmarks/bench_moe_grouped.py [--tokens 2048] [--device cpu|cuda]

Same weights, same tokens, the two paths alternate so machine noise hits both alike; prints the
median seconds of each and the ratio, and the largest output difference between them.
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
    args = ap.parse_args()
    cfg = ModelConfig(hidden_size=args.hidden, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
                      moe_intermediate_size=args.inter, moe_shared_expert_intermediate_size=args.inter)
    torch.manual_seed(0)
    moe = MoE(cfg).to(args.device)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(args.tokens, args.hidden, device=args.device)
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
            outs[grouped] = y.detach()
    g, loop = statistics.median(times[True]), statistics.median(times[False])
    print(json.dumps({"device": args.device, "tokens": args.tokens, "experts": args.experts, "top_k": args.top_k,
                      "grouped_s": round(g, 5), "loop_s": round(loop, 5), "ratio_grouped_over_loop": round(g / loop, 3),
                      "max_abs_diff": float((outs[True] - outs[False]).abs().max())}, indent=2))


if __name__ == "__main__":
    main()
