"""Synthetic reasoning problems for the demo: a `<think>` trace, then a short exact-match answer.

Three families, each with difficulty levels (more steps at higher levels); every step of a trace
is a small local computation a tiny model can learn by imitation, so accuracy grows with model
capacity and with the length of the chain it has to keep straight. The trace stops one step short:
the answer applies a final operation the trace never writes out (multiply by k, or shift every
digit by k), so answering takes capacity of its own and is not a copy of the trace's last value,
and a trace cut short (a think cap) leaves the answer without its input:
  arith  "(7+5-3+8)*3="            think "7+5=12 12-3=9 9+8=17"        answer "51"
  rev    "rev+2 3 8 2 5"           think "5 | 5 2 | 5 2 8 | 5 2 8 3"     answer "7 4 0 5"
  vars   "a=3 b=a+2 c=b*2 c*3?"    think "a=3 b=3+2=5 c=5*2=10"         answer "30"
Generation is a pure function of the seed (its own random.Random).
"""

from __future__ import annotations

import dataclasses
import random

from star_elastic.config import ConfigError

FAMILIES = ("arith", "rev", "vars")
THINK_END = "</think>"


@dataclasses.dataclass
class TaskConfig:
    """Which problems to generate."""

    families: tuple[str, ...] = FAMILIES
    """Task families to mix, uniformly."""
    levels: tuple[int, ...] = (1, 2, 3)
    """Difficulty levels to mix, uniformly (1 = shortest chains)."""

    def __post_init__(self) -> None:
        self.families, self.levels = tuple(self.families), tuple(self.levels)
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ConfigError(f"unknown task family {unknown[0] if unknown else None!r}; valid: {list(FAMILIES)}")
        if not self.levels or any(lv not in (1, 2, 3) for lv in self.levels):
            raise ConfigError(f"levels must be among 1, 2, 3, got {list(self.levels)}")


def _arith(rng: random.Random, level: int) -> tuple[str, str, str]:
    """A chain of level+3 one-digit operands (running total in 0..99), the sum times k in the answer."""
    total = rng.randint(1, 9)
    prompt, steps = str(total), []
    for _ in range(level + 2):
        n = rng.randint(1, 9)
        op = "-" if total - n >= 0 and (total + n > 99 or rng.random() < 0.4) else "+"
        new = total + n if op == "+" else total - n
        prompt += f"{op}{n}"
        steps.append(f"{total}{op}{n}={new}")
        total = new
    k = rng.randint(2, 3)
    return f"({prompt})*{k}=", " ".join(steps), str(total * k)


def _rev(rng: random.Random, level: int) -> tuple[str, str, str]:
    """Reverse a list of level+3 digits one element at a time; the answer adds k to each digit mod 10."""
    items = [rng.randint(0, 9) for _ in range(level + 3)]
    k = rng.randint(1, 3)
    partial = [" ".join(map(str, items[::-1][: i + 1])) for i in range(len(items))]
    shifted = " ".join(str((d + k) % 10) for d in items[::-1])
    return f"rev+{k} " + " ".join(map(str, items)), " | ".join(partial), shifted


def _vars(rng: random.Random, level: int) -> tuple[str, str, str]:
    """A chain of level+2 assignments, each one operation on the previous variable; the last times k."""
    names = "abcdefgh"
    value = rng.randint(1, 9)
    defs, steps = [f"a={value}"], [f"a={value}"]
    for i in range(1, level + 3):
        prev, name = names[i - 1], names[i]
        op, n = rng.choice("+-*"), rng.randint(1, 4)
        if op == "*" and value * n > 99 or op == "-" and value - n < 0:
            op = "+"
        new = {"+": value + n, "-": value - n, "*": value * n}[op]
        defs.append(f"{name}={prev}{op}{n}")
        steps.append(f"{name}={value}{op}{n}={new}")
        value = new
    k = rng.randint(2, 3)
    return " ".join(defs) + f" {names[level + 2]}*{k}?", " ".join(steps), str(value * k)


_MAKERS = {"arith": _arith, "rev": _rev, "vars": _vars}


def generate(n: int, seed: int, config: TaskConfig | None = None) -> list[dict]:
    """n problems: {"family", "level", "prompt", "think", "answer"}, deterministic in `seed`."""
    config = config or TaskConfig()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        family, level = rng.choice(config.families), rng.choice(config.levels)
        prompt, think, answer = _MAKERS[family](rng, level)
        out.append({"family": family, "level": level, "prompt": prompt, "think": think, "answer": answer})
    return out


def make_splits(n_train: int, n_val: int, n_test: int, seed: int = 0, config: TaskConfig | None = None) -> dict:
    """Fixed train / val / test splits with distinct prompts across them.

    Test and val are drawn first (so every family and level is held out even where the problem
    space is small) and their prompts are then excluded from train.
    """
    splits, seen = {}, set()
    for name, n, offset in (("test", n_test, 3), ("val", n_val, 2), ("train", n_train, 1)):
        kept, rng_seed = [], seed * 3 + offset
        while len(kept) < n:
            for ex in generate(n - len(kept) + 8, rng_seed, config):
                if len(kept) == n or ex["prompt"] in seen:
                    continue  # held-out prompts stay unique and out of train; train may repeat itself
                if name != "train":
                    seen.add(ex["prompt"])
                kept.append(ex)
            rng_seed += 1000
        splits[name] = kept
    return {k: splits[k] for k in ("train", "val", "test")}


def parse_answer(text: str) -> str | None:
    """The answer after the last `</think>`, up to the end-of-text marker; None if no trace ended."""
    if THINK_END not in text:
        return None
    answer = text.rsplit(THINK_END, 1)[1]
    for stop in ("</s>", "<|user|>"):
        answer = answer.split(stop, 1)[0]
    return answer.strip()


def check_answer(generated_text: str, answer: str) -> bool:
    return parse_answer(generated_text) == answer.strip()
