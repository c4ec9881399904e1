"""`make parent`: retrain the shipped parent from the committed config into a temporary folder and say
whether its model.safetensors is byte-identical to the shipped one, and its test accuracy.

    python benchmarks/retrain_parent.py [--config configs/parent.yaml] [--keep DIR]

Training is fixed work (steps, seed, threads in the config), so on the machine type the parent was
trained on the bytes are expected to match; another CPU's floating-point path may give other bytes
and another accuracy (README, "What the demo shows").
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from star_elastic.assets import PARENT, sha256
from star_elastic.train.parent import load_parent_config, train_parent

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "parent.yaml"))
    ap.add_argument("--keep", help="write the retrained parent here instead of a temporary folder")
    args = ap.parse_args()
    cfg = load_parent_config(args.config, {})
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="star-elastic-parent-"))
    try:
        _, report = train_parent(cfg, out)
        new, shipped = sha256(out / "model.safetensors"), sha256(PARENT / "model.safetensors")
        shipped_acc = json.loads((PARENT / "train_report.json").read_text())["test"]["accuracy"]
        print(json.dumps({"identical": new == shipped, "sha256": new, "shipped_sha256": shipped,
                          "accuracy": report["test"]["accuracy"], "shipped_accuracy": shipped_acc,
                          "n_test": report["test"]["n"], "train_seconds": report["train_seconds"]}, indent=2))
        print(f"model.safetensors {'IS' if new == shipped else 'is NOT'} byte-identical to the shipped parent; "
              f"test accuracy {report['test']['accuracy']:.2%} (shipped {shipped_acc:.2%})")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
