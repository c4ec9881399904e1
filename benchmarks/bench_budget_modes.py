"""Budgets that hold, measured: elastify one parent once per budget mode, evaluate every budget.

    python benchmarks/bench_budget_modes.py --parent PARENT --out OUT                 # all variants, then the table
    python benchmarks/bench_budget_modes.py --parent PARENT --out OUT --variants none,band
    python benchmarks/bench_budget_modes.py --out OUT --table                         # the table of what OUT holds

Variants (ElasticConfig overrides; everything else is the demo's elastify, `DemoConfig().elastify`,
with one seed, --seed, default 0, so runs differ only in how budgets are held):
    none     budget_mode none: plain squared router loss, no projection after training (the
             behaviour before budgets were held)
    band     the default: dead-zone loss, projection onto ±2% of the target
    ceiling  budget_mode ceiling: never above the target
    nested   band + nested: a smaller budget's architecture is contained in every larger one's
    band-boundary, nested-boundary
             band / nested with settle_every 0: the picks are projected onto the windows only at the
             stage boundary and after training, not every 50 steps (how budgets were held before)
Each variant trains into OUT/VARIANT/run, evaluates every budget as the demo does
(`demo.evaluate_budgets`: the demo's 300 held-out problems, greedy, think cap 64) and writes
OUT/VARIANT/result.json; a variant whose result.json exists is not run again.
Run it alone on the machine (OMP_NUM_THREADS=1 on a shared one): each variant is one full elastify.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {"none": {"budget_mode": "none"}, "band": {}, "ceiling": {"budget_mode": "ceiling"},
            "nested": {"nested": True}, "band-boundary": {"settle_every": 0}, "nested-boundary": {"nested": True, "settle_every": 0}}
ELASTIFY_KEYS = ("settle_every",)
"""Variant keys that are ElastifyConfig fields; the others are ElasticConfig fields."""
AXES = ("hidden", "attn_heads", "mamba_heads", "experts", "expert_inter", "shared_inter", "mlp_inter")
KEYS = ("target", "achieved", "budget_type", "held", "total_params", "active_params", "total_fraction",
        "active_fraction", "architecture")


def run_variant(parent: str, out: Path, variant: dict, steps: int | None, seed: int) -> dict:
    from star_elastic.config import from_dict
    from star_elastic.demo import DemoConfig, evaluate_budgets
    from star_elastic.elastic.run import load_elastic
    from star_elastic.infer.evaluate import load_eval_examples
    from star_elastic.train.elastify import ElastifyConfig, train

    demo = DemoConfig()
    elastic = {k: v for k, v in variant.items() if k not in ELASTIFY_KEYS}
    overrides = dict(demo.elastify, model=parent, out=str(out / "run"), overwrite=True, elastic=elastic, seed=seed,
                     **{k: v for k, v in variant.items() if k in ELASTIFY_KEYS})
    if steps is not None:
        overrides["steps"] = steps
    t0 = time.perf_counter()
    train(from_dict(ElastifyConfig, overrides, source="bench"))
    t1 = time.perf_counter()
    elastic_lm = load_elastic(out / "run")
    rows = evaluate_budgets(out / "run", load_eval_examples(None, demo.n_test), demo)
    budgets = [{"budget": b, **{k: elastic_lm.describe(b)[k] for k in KEYS}, "accuracy": row["accuracy"]}
               for b, row in zip(elastic_lm.ecfg.budgets, rows)]
    return {"elastic": elastic, "settle_every": overrides.get("settle_every", ElastifyConfig.settle_every),
            "steps": overrides["steps"], "seed": seed, "elastify_seconds": round(t1 - t0, 1),
            "evaluate_seconds": round(time.perf_counter() - t1, 1), "n_test": demo.n_test, "budgets": budgets}


def contained(small: dict, large: dict) -> bool:
    """True when `small` keeps at most `large`'s components on every axis (and a subset of its layers)."""
    return all(small[a] <= large[a] for a in AXES) and set(small["layers"]) <= set(large["layers"])


def late_sampled_cost(run: Path, budget: float, share: float = 0.1) -> float | None:
    """Mean relative cost of the Gumbel-sampled architectures of `budget` over the last `share` of
    training (metrics.jsonl): where training held the budget before any final projection."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r["relative_cost"] for r in records[int(len(records) * (1 - share)):] if r["budget"] == budget]
    return sum(last) / len(last) if last else None


def table(out: Path) -> str:
    lines = ["| variant | budget | target → achieved | sampled in the last 10% of steps | total params | "
             "active params | nested in the larger | accuracy | elastify (s) |", "|---" * 9 + "|"]
    for name in [*VARIANTS, *sorted(p.parent.name for p in out.glob("*/result.json") if p.parent.name not in VARIANTS)]:
        path = out / name / "result.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        for prev, b in zip([None, *r["budgets"]], r["budgets"]):
            nest = "" if prev is None else ("yes" if contained(b["architecture"], prev["architecture"]) else "no")
            late = late_sampled_cost(out / name / "run", b["budget"])
            lines.append(
                f"| {name} | {b['budget']:g} | {b['target']:.3f} → {b['achieved']:.3f} "
                f"({b['achieved'] / b['target'] - 1:+.1%}) | {'' if late is None else f'{late:.3f}'} | "
                f"{b['total_params']:,} ({b['total_fraction']:.3f}) | "
                f"{b['active_params']:,} ({b['active_fraction']:.3f}) | {nest} | {b['accuracy']:.1%} | "
                f"{r['elastify_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", help="parent model folder (the demo's: DEMO_OUT/parent)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--steps", type=int, help="elastify steps (default: the demo's)")
    ap.add_argument("--seed", type=int, default=0, help="elastify seed (data order, calibration, Gumbel noise)")
    ap.add_argument("--table", action="store_true", help="only print the table of what OUT holds")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.table:
        if not args.parent:
            ap.error("--parent is required to run variants")
        for name in args.variants.split(","):
            if name not in VARIANTS:
                ap.error(f"--variants: unknown variant {name!r}; use some of {list(VARIANTS)}")
            if (out / name / "result.json").is_file():
                continue
            result = run_variant(args.parent, out / name, VARIANTS[name], args.steps, args.seed)
            (out / name / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(out))


if __name__ == "__main__":
    main()
