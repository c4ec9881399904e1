"""Peak memory of the distillation loss: chunked (train/distill.py) ÷ full logits, vocab 131,072.

    .venv/bin/python benchmarks/bench_kd_memory.py [--tokens 1024] [--hidden 256] [--chunk 256]

Each variant runs in its own fresh process: loss forward + backward from the student's and the
teacher's final hidden states through their LM heads (the full variant: both (T, V) logits, then
`kd_loss`). The peak is the process's resident high-water mark (VmHWM, reset after setup) minus
its resident size after setup; large allocations are served by mmap and returned on free, so the
high-water mark is the tensors' own peak. Goal: ratio ≤ 0.25.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _variant(name: str, tokens: int, hidden: int, vocab: int, chunk: int) -> int:
    import torch

    from star_elastic.train.distill import chunked_distill_sums, kd_loss

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD fixed at 64 KiB: big tensors mmap'd
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    head_t.requires_grad_(False)
    h_s = torch.randn(1, tokens, hidden, requires_grad=True)
    h_t = torch.randn(1, tokens, hidden)
    mask = torch.ones(1, tokens)
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
    base = _status("VmRSS")
    if name == "full":
        loss = kd_loss(head_s(h_s), head_t(h_t), mask)
    else:
        loss = chunked_distill_sums(h_s, h_t, head_s, head_t, mask, chunk_tokens=chunk)[0] / tokens
    loss.backward()
    return _status("VmHWM") - base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=131_072)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(_variant(args.variant, args.tokens, args.hidden, args.vocab, args.chunk))
        return
    peaks = {}
    for name in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--variant", name] + [f"--{k}={getattr(args, k)}" for k in
                                                              ("tokens", "hidden", "vocab", "chunk")]
        peaks[name] = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
    logits = args.tokens * args.vocab * 4
    print(json.dumps({"tokens": args.tokens, "vocab": args.vocab, "chunk_tokens": args.chunk,
                      "one_fp32_logits_MiB": round(logits / 2**20, 1),
                      "full_peak_MiB": round(peaks["full"] / 2**20, 1),
                      "chunked_peak_MiB": round(peaks["chunked"] / 2**20, 1),
                      "ratio_chunked_over_full": round(peaks["chunked"] / peaks["full"], 4)}, indent=2))


if __name__ == "__main__":
    main()
