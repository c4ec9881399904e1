"""The Mamba-2 scan's decays as computed (exp of arguments floored at mamba2.LOG_TINY, acausal half
multiplied by 0) against the textbook form (acausal half set to -inf, plain exp), side by side.

    .venv/bin/python benchmarks/bench_mamba_decay.py MODEL_OR_RUN [--rounds 6] [--threads 1]

torch's CPU exp leaves its vectorised path for -inf (about 30x slower per element) and for
arguments whose result underflows (x < -87.34: 100-300x), and a trained model's decays reach
there (dt·A summed over a chunk). Times every Mamba layer of the model (an HF checkpoint or an
elastic run's model) at prefill shapes (inference) and at the demo parent's training shape
(forward + backward), on unit-scale random inputs (what the block's RMSNorm hands the mixer), the
two forms alternating within each round; prints the medians, their
ratio, the largest output difference, and the share of decay arguments below -87.34.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from star_elastic import load_model
from star_elastic.model import mamba2
from star_elastic.model.mamba2 import Mamba2Mixer, MambaState
from star_elastic.runtime import tune_cpu_allocator

LOG_FP32_TINY = math.log(torch.finfo(torch.float32).tiny)  # -87.34: exp below it underflows


def textbook_decay_matrix(a_cum: torch.Tensor) -> torch.Tensor:
    n = a_cum.shape[-1]
    diff = a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)
    causal = torch.ones(n, n, dtype=torch.bool, device=a_cum.device).tril()
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


FORMS = {
    "floored": (mamba2._decay_matrix, mamba2._exp_decay),
    "textbook": (textbook_decay_matrix, torch.exp),
}


def use(form: str) -> None:
    mamba2._decay_matrix, mamba2._exp_decay = FORMS[form]


def underflow_share(mixers, hidden: torch.Tensor) -> float:
    """Share of the within-chunk decay arguments (causal part) below log(fp32 tiny)."""
    seen = []
    original = mamba2._decay_matrix

    def record(a_cum):
        n = a_cum.shape[-1]
        diff = a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)
        causal = torch.ones(n, n, dtype=torch.bool).tril().expand_as(diff)
        seen.append((diff[causal] < LOG_FP32_TINY).float().mean().item())
        return original(a_cum)

    mamba2._decay_matrix = record
    try:
        with torch.inference_mode():
            for mix in mixers:
                mix(hidden, MambaState())
    finally:
        mamba2._decay_matrix = original
    return statistics.mean(seen)


def time_prefill(mixers, hidden: torch.Tensor, reps: int) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        for _ in range(reps):
            for mix in mixers:
                mix(hidden, MambaState())
    return (time.perf_counter() - t) / reps * 1000


def time_train(mixers, hidden: torch.Tensor, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        for mix in mixers:
            mix(hidden).sum().backward()
    return (time.perf_counter() - t) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, help="an HF nemotron_h checkpoint or an elastic run folder")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    path = args.model / "model" if (args.model / "run.json").exists() else args.model
    model = load_model(path)
    mixers = [m for m in model.modules() if isinstance(m, Mamba2Mixer)]
    hidden_size = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    cases = {f"prefill B{b} T{t}": (time_prefill, torch.randn(b, t, hidden_size, generator=g), reps)
             for b, t, reps in ((1, 32, 40), (4, 40, 20), (8, 96, 8))}
    cases["train B48 T96 fwd+bwd"] = (time_train, torch.randn(48, 96, hidden_size, generator=g), 2)
    print(f"{len(mixers)} Mamba layers of {path}, {args.threads} thread(s), medians of {args.rounds} rounds (ms for all layers)")
    print(f"{'case':24s} {'textbook':>9s} {'floored':>9s} {'floored/textbook':>17s} {'max |diff|':>11s} {'args < -87.34':>14s}")
    for name, (fn, hidden, reps) in cases.items():
        times = {form: [] for form in FORMS}
        for _ in range(args.rounds):
            for form in FORMS:
                use(form)
                times[form].append(fn(mixers, hidden, reps))
        outs = {}
        with torch.inference_mode():
            for form in FORMS:
                use(form)
                outs[form] = [mix(hidden, MambaState()) for mix in mixers]
        use("floored")
        diff = max((a - b).abs().max().item() for a, b in zip(outs["floored"], outs["textbook"]))
        med = {form: statistics.median(v) for form, v in times.items()}
        print(f"{name:24s} {med['textbook']:9.2f} {med['floored']:9.2f} {med['floored'] / med['textbook']:17.2f} "
              f"{diff:11.2e} {underflow_share(mixers, hidden):14.1%}")


if __name__ == "__main__":
    main()
