"""Which budgets an optimizer step trains: `step`, `micro_batch` and `all`, side by side on the demo's
recipe (configs/elastify.yaml on the shipped parent), at equal tokens and at equal CPU time.

    python benchmarks/ablation_budget_sampling.py --out DIR [--only NAME ...]

Runs (one torch thread each, fixed seeds, resumable: a finished run in DIR/NAME is reused):
  step-600         one budget per step, 600 steps
  micro_batch-600  one budget per micro-batch of 8 rows (3 per step), 600 steps
  all-600          every budget on every step, 600 steps (equal tokens: the same rows)
  all-equal-cpu    every budget on every step, its steps cut so its CPU time is step-600's
Each run's budgets are evaluated as the demo does: the 300 held-out problems, greedy, think cap 64.
Prints a markdown table: per-budget accuracy with its standard error, data tokens, student tokens
(tokens × budgets trained on them) and CPU seconds (this process's user + system time of the
elastification). Figures are the CPU seconds of the machine it ran on; run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
from pathlib import Path

import torch

from star_elastic.assets import PARENT
from star_elastic.baselines import run_tokens
from star_elastic.elastic.run import load_elastic
from star_elastic.infer.budget import ElasticServer
from star_elastic.infer.evaluate import BudgetConfig, evaluate_config, load_eval_examples
from star_elastic.train.elastify import load_elastify_config, train

ROOT = Path(__file__).resolve().parents[1]
# step and all run each step's 24 rows as one micro-batch (micro_batch_size none); micro_batch cuts
# them into 3 micro-batches of 8, each with its own draw (the recipe's configs/elastify.yaml)
RUNS = {"step-600": {"budget_sampling": "step", "steps": 600, "micro_batch_size": None},
        "micro_batch-600": {"budget_sampling": "micro_batch", "steps": 600, "micro_batch_size": 8},
        "all-600": {"budget_sampling": "all", "steps": 600, "micro_batch_size": None},
        "all-equal-cpu": {"budget_sampling": "all", "micro_batch_size": None}}  # steps: step-600's CPU time


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(name: str, overrides: dict, out: Path, n_test: int) -> dict:
    result_path = out / name / "ablation.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    cfg = load_elastify_config(str(ROOT / "configs" / "elastify.yaml"), {})
    overrides = dict(overrides)
    engine = dataclasses.replace(cfg.engine, micro_batch_size=overrides.pop("micro_batch_size"))
    cfg = dataclasses.replace(cfg, model=str(PARENT), out=str(out / name), resume="auto", checkpoint_every=100,
                              engine=engine, **overrides)
    start = cpu_seconds()
    train(cfg)
    cpu = cpu_seconds() - start
    elastic = load_elastic(out / name)
    server = ElasticServer.from_elastic(elastic)
    examples = load_eval_examples(None, n_test)
    accuracy = {f"{b:g}": evaluate_config(server, examples, BudgetConfig(b, b, 64), n_test)["accuracy"]
                for b in elastic.ecfg.budgets}
    tokens = run_tokens(out / name)
    per_token = len(elastic.ecfg.budgets) if cfg.budget_sampling == "all" else 1
    result = {"name": name, "budget_sampling": cfg.budget_sampling, "steps": cfg.steps, "tokens": tokens,
              "student_tokens": tokens * per_token, "cpu_s": round(cpu, 1), "accuracy": accuracy, "n_test": n_test,
              "achieved": {f"{b:g}": elastic.describe(b)["achieved"] for b in elastic.ecfg.budgets}}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(results: list[dict]) -> str:
    budgets = list(results[0]["accuracy"])
    lines = ["| run | budgets per step | steps | data tokens | student tokens | CPU s | "
             + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|---|---|---|---|---|" + "---|" * len(budgets)]
    for r in results:
        cells = []
        for b in budgets:
            p = r["accuracy"][b]
            cells.append(f"{p:.1%} ± {math.sqrt(p * (1 - p) / r['n_test']):.1%}")
        lines.append(f"| {r['name']} | {r['budget_sampling']} | {r['steps']} | {r['tokens']:,} | {r['student_tokens']:,} "
                     f"| {r['cpu_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--n-test", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    results = {}
    for name in args.only:
        overrides = dict(RUNS[name])
        if name == "all-equal-cpu":
            step, every = (results.get(n) or run(n, RUNS[n], out, args.n_test) for n in ("step-600", "all-600"))
            overrides["steps"] = round(every["steps"] * step["cpu_s"] / every["cpu_s"])
        results[name] = run(name, overrides, out, args.n_test)
    print(table(list(results.values())))


if __name__ == "__main__":
    main()
