"""Write demo-style test problems as jsonl for the lm-eval task star_elastic_demo.yaml.

    python interop/lm_eval/write_jsonl.py OUT.jsonl [--n 300] [--seed 12345]
"""

import argparse
import json
from pathlib import Path

from star_elastic.data import synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=12345)
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    rows = synthetic.generate(a.n, a.seed)
    a.out.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    print(f"wrote {len(rows)} problems to {a.out}")


if __name__ == "__main__":
    main()
