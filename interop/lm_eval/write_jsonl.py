"""Write demo-style test problems as jsonl for the lm-eval tasks in this folder.

    python interop/lm_eval/write_jsonl.py OUT.jsonl [--n 300] [--seed 12345]             (star_elastic_demo)
    python interop/lm_eval/write_jsonl.py OUT.jsonl --choices 4 [--n 100] [--seed 777]   (star_elastic_demo_mc)

With --choices K each row is a multiple-choice item: `context` is the chat prompt with the problem's
reference trace, ending at `</think>`; `choices` are the right answer and K-1 distractors (each with
the closing `</s>`, so "3" and "33" are told apart), shuffled; `label` is the right one's index.
Distractors are near misses: a number ±1, ±2, ...; a digit list with one digit changed.
"""

import argparse
import json
import random
from pathlib import Path

from star_elastic.data import synthetic
from star_elastic.data.tokenizer import build_tokenizer, format_prompt


def near_misses(answer: str, k: int) -> list[str]:
    """k wrong answers of the same shape as `answer`."""
    if answer.isdigit():
        steps = [d for i in range(1, k + 2) for d in (i, -i)]
        return [str(int(answer) + d) for d in steps if int(answer) + d >= 0][:k]
    digits = answer.split(" ")  # the rev family: space-separated digits
    return [" ".join(str((int(d) + 1) % 10) if j == i else d for j, d in enumerate(digits)) for i in range(k)]


def choice_row(problem: dict, k: int, tok, rng: random.Random) -> dict:
    choices = [problem["answer"], *near_misses(problem["answer"], k - 1)]
    rng.shuffle(choices)
    context = format_prompt(tok, problem["prompt"]) + problem["think"] + "</think>"
    return {"context": context, "choices": [c + "</s>" for c in choices], "label": choices.index(problem["answer"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=None, help="problems (default 300; 100 with --choices)")
    ap.add_argument("--seed", type=int, default=None, help="default 12345; 777 with --choices")
    ap.add_argument("--choices", type=int, default=None, help="write multiple-choice items with this many choices")
    a = ap.parse_args()
    mc = a.choices is not None
    n, seed = a.n or (100 if mc else 300), a.seed if a.seed is not None else (777 if mc else 12345)
    problems = synthetic.generate(n, seed)
    if mc:
        tok, rng = build_tokenizer(), random.Random(seed)
        rows = [choice_row(p, a.choices, tok, rng) for p in problems]
    else:
        rows = [{"prompt": p["prompt"], "answer": p["answer"]} for p in problems]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} {'multiple-choice items' if mc else 'problems'} to {a.out}")


if __name__ == "__main__":
    main()
