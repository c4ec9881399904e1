"""Gradient accumulation over length-sorted micro-batches (`micro_batch_size`) against one forward
of the whole padded batch, on the demo's recipes (the demo parent's config, built-in data).

    .venv/bin/python benchmarks/bench_micro_batches.py [--rounds 5] [--threads 2]

1. Parent training step (batch 48): padded tokens per step (machine-independent) and step time,
   one forward vs micro-batches of 24 / 16 / 8, the same sampled batches, interleaved per step so a
   slow spell of a shared machine lands on every variant; medians.
2. Elastify (the demo's configs/elastify.yaml, batch 24, on a random-initialised demo-size parent):
   step time in stage 1 (packed rows of 64 tokens) and stage 2 (128), micro-batches of 8 vs none,
   runs alternated `--rounds` times; medians of the per-step times in metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from star_elastic.config import from_dict
from star_elastic.data import synthetic
from star_elastic.data.tokenizer import build_tokenizer, encode_example
from star_elastic.hf import save_model
from star_elastic.model.hybrid import HybridLM
from star_elastic.train.elastify import ElastifyConfig, load_elastify_config, train
from star_elastic.train.parent import ParentConfig, accumulate_lm, length_groups, model_config


def padded_tokens(picked, rows) -> int:
    return sum(len(g) * max(len(picked[i][0]) for i in g) for g in length_groups([len(p[0]) for p in picked], rows))


def parent_steps(rounds: int) -> None:
    cfg, tok = ParentConfig(), build_tokenizer()
    train_set = [encode_example(tok, ex) for ex in synthetic.make_splits(5000, 10, 10, seed=0)["train"]]
    model = HybridLM(model_config(cfg, tok)).init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng, variants = random.Random(0), (None, 24, 16, 8)
    times, tokens, real = {v: [] for v in variants}, {v: [] for v in variants}, []
    for i in range(3 + 8 * rounds):
        picked = [train_set[rng.randrange(len(train_set))] for _ in range(cfg.batch_size)]
        real.append(sum(len(p[0]) for p in picked))
        for rows in variants:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            accumulate_lm(model, picked, rows, 0)
            opt.step()
            if i >= 3:  # warm-up steps not counted
                times[rows].append(time.perf_counter() - t0)
                tokens[rows].append(padded_tokens(picked, rows))
    print(f"parent step, batch {cfg.batch_size} ({statistics.mean(real):.0f} real tokens on average), "
          f"{len(times[None])} steps each:")
    base = statistics.median(times[None])
    for rows in variants:
        t = statistics.median(times[rows])
        print(f"  micro_batch_size {str(rows):4s}: {statistics.mean(tokens[rows]):6.0f} padded tokens, "
              f"{t * 1e3:6.1f} ms/step ({t / base:.2f}x one forward)")


def elastify_steps(rounds: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer()
        parent = HybridLM(model_config(ParentConfig(), tok)).init_weights(0)
        parent.tokenizer = tok
        save_model(parent, Path(tmp) / "parent")
        base = load_elastify_config("configs/elastify.yaml", {})
        per = {None: {1: [], 2: []}, 8: {1: [], 2: []}}
        for r in range(rounds):
            for rows in per:
                out = Path(tmp) / f"run-{r}-{rows}"
                cfg = from_dict(ElastifyConfig, vars(base) | dict(model=str(Path(tmp) / "parent"), out=str(out),
                                                                 steps=steps, micro_batch_size=rows,
                                                                 checkpoint_every=10**6))
                train(cfg, log=lambda m: None)
                lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                for a, b in zip(lines, lines[1:]):
                    per[rows][b["stage"]].append(b["seconds"] - a["seconds"])
        print(f"elastify step (configs/elastify.yaml, batch {base.batch_size}), {rounds} x {steps} steps each:")
        for stage in (1, 2):
            one = statistics.median(per[None][stage])
            micro = statistics.median(per[8][stage])
            print(f"  stage {stage}: one forward {one * 1e3:.0f} ms, micro_batch_size 8 {micro * 1e3:.0f} ms "
                  f"({micro / one:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--elastify-steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parent_steps(args.rounds)
    elastify_steps(args.rounds, args.elastify_steps)


if __name__ == "__main__":
    main()
