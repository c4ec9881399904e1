"""Per-item log-likelihoods of two lm-eval runs of one multiple-choice task must agree.

    python interop/lm_eval_loglik_check.py SERVED.jsonl LOCAL.jsonl [--atol 1e-4]

Both files are lm-eval `--log_samples` outputs (samples_TASK_*.jsonl) of the same task: typically
`--model local-completions` through `star-elastic serve` at budget B, and `--model hf` on the slice
of budget B (interop/lm_eval/README.md). Every document must be present in both with the same
requests (context and continuation of each choice); then for every choice the two log-likelihoods
must differ by at most ATOL nats, and both runs must pick the same choice (unless the two picks tie
within 2 ATOL). Prints the largest and
mean difference, the number of choices past ATOL, and each run's accuracy.

ATOL 1e-4 nats: both sides compute in fp32 on the CPU. On the 100 items of star_elastic_demo_mc over
`make interop`'s fp32 slice, star_elastic's own forward and `lm_eval --model hf` differ by at most
7.8e-6 nats per choice; the server adds its batching (left padding) and the view of the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_samples(path: Path) -> dict[int, dict]:
    """doc_id → {"requests": [(context, continuation), ...], "ll": [float, ...], "acc": float | None}."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line)
        try:
            requests = [(a["arg_0"], a["arg_1"]) for _, a in sorted(row["arguments"].items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]
            ll = [float(r[0]) for r in row["filtered_resps"]]  # lm-eval writes (loglikelihood, is_greedy) as strings
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise SystemExit(f"{path}:{n}: not a loglikelihood sample of lm-eval --log_samples ({err!r})") from None
        out[row["doc_id"]] = {"requests": requests, "ll": ll, "acc": row.get("acc")}
    return out


def compare(a: dict[int, dict], b: dict[int, dict], atol: float) -> dict:
    """Differences per choice and per item's pick; raises SystemExit when the runs are not of the same items."""
    if a.keys() != b.keys():
        raise SystemExit(f"the runs scored different documents: {len(a.keys() ^ b.keys())} in one only")
    diffs, picks_differ = [], []
    for doc_id in sorted(a):
        if a[doc_id]["requests"] != b[doc_id]["requests"]:
            raise SystemExit(f"doc {doc_id}: the runs sent different requests (context or choices)")
        la, lb = a[doc_id]["ll"], b[doc_id]["ll"]
        diffs += [abs(x - y) for x, y in zip(la, lb)]
        pa, pb = la.index(max(la)), lb.index(max(lb))
        if pa != pb and abs(lb[pa] - lb[pb]) > 2 * atol:  # not a tie within the tolerance
            picks_differ.append(doc_id)
    return {"items": len(a), "choices": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "past_atol": sum(d > atol for d in diffs), "picks_differ": picks_differ}


def accuracy(samples: dict[int, dict]) -> float | None:
    accs = [s["acc"] for s in samples.values() if s["acc"] is not None]
    return sum(accs) / len(accs) if accs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("served", type=Path, help="samples jsonl of the run through the server")
    ap.add_argument("local", type=Path, help="samples jsonl of --model hf on the slice")
    ap.add_argument("--atol", type=float, default=1e-4, help="nats per choice (default 1e-4)")
    a = ap.parse_args()
    served, local = read_samples(a.served), read_samples(a.local)
    r = compare(served, local, a.atol)
    print(f"{r['items']} items, {r['choices']} choices: log-likelihood |served - local| max {r['max_abs_diff']:.2e}, "
          f"mean {r['mean_abs_diff']:.2e} nats; {r['past_atol']} past {a.atol:g}; picks differ on "
          f"{len(r['picks_differ'])} item(s) {r['picks_differ'][:10]}; accuracy served {accuracy(served)}, "
          f"local {accuracy(local)}")
    return 0 if r["past_atol"] == 0 and not r["picks_differ"] else 1


if __name__ == "__main__":
    sys.exit(main())
