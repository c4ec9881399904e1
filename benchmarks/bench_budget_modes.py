"""Budgets that hold, measured: elastify the demo parent once per budget mode, evaluate every budget.

    python benchmarks/bench_budget_modes.py --parent PARENT --out OUT --variant band
    python benchmarks/bench_budget_modes.py --parent PARENT --out OUT --variant ceiling --elastic '{"budget_mode": "ceiling"}'
    python benchmarks/bench_budget_modes.py --parent PARENT --out OUT --variant nested --elastic '{"nested": true}'
    python benchmarks/bench_budget_modes.py --out OUT --table

Each variant runs the demo's elastify settings (`DemoConfig().elastify`, seed 0) on the same parent,
then `demo.evaluate_budgets` on the demo's held-out problems, and writes OUT/VARIANT/result.json.
The script reads only fields older star_elastic versions also have, so running it with
PYTHONPATH pointing at an older checkout measures the behaviour before budgets were settled.
`--table` prints every variant's target vs achieved cost, parameter fractions and accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run_variant(parent: str, out: Path, elastic: dict, steps: int | None) -> dict:
    from star_elastic.config import from_dict
    from star_elastic.demo import DemoConfig, evaluate_budgets
    from star_elastic.elastic.run import load_elastic
    from star_elastic.infer.evaluate import load_eval_examples
    from star_elastic.train.elastify import ElastifyConfig, train

    demo = DemoConfig()
    overrides = dict(demo.elastify, model=parent, out=str(out / "run"), elastic=elastic)
    if steps is not None:
        overrides["steps"] = steps
    t0 = time.perf_counter()
    train(from_dict(ElastifyConfig, overrides, source="bench"))
    seconds = time.perf_counter() - t0
    elastic_lm = load_elastic(out / "run")
    rows = evaluate_budgets(out / "run", load_eval_examples(None, demo.n_test), demo)
    budgets = []
    for b, row in zip(elastic_lm.ecfg.budgets, rows):
        info = elastic_lm.describe(b)
        budgets.append({"budget": b, "achieved": info["relative_cost"], "total_fraction": info["total_fraction"],
                        "active_fraction": info["active_fraction"], "architecture": info["architecture"],
                        "accuracy": row["accuracy"]})
    return {"elastic": elastic, "elastify_seconds": round(seconds, 1), "n_test": demo.n_test, "budgets": budgets}


def table(out: Path) -> str:
    lines = ["| variant | budget | target → achieved | total fraction | active fraction | accuracy |", "|---|---|---|---|---|---|"]
    for path in sorted(out.glob("*/result.json")):
        r = json.loads(path.read_text())
        for b in r["budgets"]:
            lines.append(f"| {path.parent.name} | {b['budget']:g} | {b['budget']:.3f} → {b['achieved']:.3f} | "
                         f"{b['total_fraction']:.3f} | {b['active_fraction']:.3f} | {b['accuracy']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant")
    ap.add_argument("--elastic", default="{}", help="ElasticConfig overrides as JSON")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        print(table(out))
        return
    result = run_variant(args.parent, out / args.variant, json.loads(args.elastic), args.steps)
    (out / args.variant / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["budgets"], indent=2))


if __name__ == "__main__":
    main()
