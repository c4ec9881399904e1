"""Accuracy and latency of budget configurations, the accuracy–latency Pareto front, plots.

A configuration is (think_budget, answer_budget, max_think_tokens). Accuracy is exact match of the
answer parsed after `</think>`. Queries run in batches; `latency_s` is the mean wall time a query
waits for its batch (think + answer phases), which is what a batched server's clients see, and is
comparable across configurations measured with the same batch size.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from star_elastic.config import ConfigError
from star_elastic.data import synthetic
from star_elastic.data.tokenizer import format_prompt
from star_elastic.infer.budget import ElasticServer
from star_elastic.infer.generate import GenerationConfig, generate


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    think_budget: float | str
    """A router budget, or a variant name of explicit architectures."""
    answer_budget: float | str
    max_think_tokens: int

    @property
    def label(self) -> str:
        return _label(dataclasses.asdict(self))


def load_eval_examples(path: str | None, n_test: int = 400, seed: int = 0) -> list[dict]:
    """The held-out synthetic test split, or a local jsonl of {"prompt", "answer"} records."""
    if path is None:
        return synthetic.make_splits(1, 0, n_test, seed=seed)["test"][:n_test] if n_test else []
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rec = json.loads(line)
                if not {"prompt", "answer"} <= set(rec):
                    raise ConfigError(f"{path}:{n}: eval records need 'prompt' and 'answer'")
                records.append({"family": rec.get("family", "custom"), "level": rec.get("level", 0), **rec})
    return records


def evaluate_config(server: ElasticServer, examples: list[dict], cfg: BudgetConfig, batch_size: int = 100,
                    max_answer_tokens: int = 24) -> dict:
    """Accuracy, latency and token counts of one budget configuration."""
    tok = server.parent.tokenizer
    correct, latencies, think_tokens, answer_tokens, think_s, answer_s = [], [], 0, 0, 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tok.encode(format_prompt(tok, ex["prompt"]), add_special_tokens=False) for ex in chunk]
        run = server.generate(prompts, cfg.think_budget, cfg.answer_budget, cfg.max_think_tokens, max_answer_tokens)
        for ex, res in zip(chunk, run.results):
            text = "<think>" + tok.decode(res.think_tokens + res.answer_tokens, skip_special_tokens=False)
            correct.append(synthetic.check_answer(text, ex["answer"]))
            think_tokens += len(res.think_tokens)
            answer_tokens += len(res.answer_tokens)
        latencies += [run.think_seconds + run.answer_seconds] * len(chunk)
        think_s += run.think_seconds
        answer_s += run.answer_seconds
    n = max(1, len(examples))
    return {
        "think_budget": cfg.think_budget, "answer_budget": cfg.answer_budget, "max_think_tokens": cfg.max_think_tokens,
        "accuracy": sum(correct) / n, "latency_s": sum(latencies) / n,
        "think_tokens": think_tokens / n, "answer_tokens": answer_tokens / n,
        "tokens_per_s": (think_tokens + answer_tokens) / max(1e-9, think_s + answer_s),
        "think_seconds": think_s, "answer_seconds": answer_s, "n": len(examples), "batch_size": batch_size,
    }


def pareto_front(points: list[dict], x: str = "latency_s", y: str = "accuracy") -> list[bool]:
    """on_front[i]: no other point has lower-or-equal x and higher-or-equal y with one strict."""
    flags = []
    for p in points:
        dominated = any(
            q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y]) for q in points if q is not p
        )
        flags.append(not dominated)
    return flags


def headline(points: list[dict], parent: dict) -> dict:
    """Paper-style comparison with the parent's default budget control.

    at_equal_accuracy: fastest configuration with accuracy ≥ the parent's → latency ratio.
    at_equal_latency: most accurate configuration with latency ≤ the parent's → accuracy gain.
    """
    not_parent = [p for p in points if p is not parent]
    faster = [p for p in not_parent if p["accuracy"] >= parent["accuracy"]]
    cheaper = [p for p in not_parent if p["latency_s"] <= parent["latency_s"]]
    out = {"parent": {k: parent[k] for k in ("think_budget", "answer_budget", "max_think_tokens", "accuracy", "latency_s")}}
    if faster:
        best = min(faster, key=lambda p: p["latency_s"])
        out["at_equal_accuracy"] = {"config": _label(best), "accuracy": best["accuracy"], "latency_s": best["latency_s"],
                                    "latency_reduction": parent["latency_s"] / best["latency_s"]}
    if cheaper:
        best = max(cheaper, key=lambda p: (p["accuracy"], -p["latency_s"]))
        out["at_equal_latency"] = {"config": _label(best), "accuracy": best["accuracy"], "latency_s": best["latency_s"],
                                   "accuracy_gain": best["accuracy"] - parent["accuracy"]}
    return out


def small_think_large_answer(points: list[dict]) -> list[dict]:
    """Against the parent (budget 1 → 1) at each think cap: the best configuration whose thinker is
    smaller than its answerer, at equal-or-better accuracy (latency ratio) and at equal-or-lower
    latency (accuracy gain); the paper's comparison (+16% accuracy, 1.9x lower latency)."""
    mixed = [p for p in points if p["think_budget"] < p["answer_budget"]]
    rows = []
    for parent in (p for p in points if p["think_budget"] == p["answer_budget"] == 1.0):
        h = headline([parent, *mixed], parent)
        rows.append({"parent_cap": parent["max_think_tokens"], **h,
                     "on_front": [_label(p) for p in mixed if p.get("on_front")]})
    return rows


def _label(p: dict) -> str:
    return f"{_name(p['think_budget'])}→{_name(p['answer_budget'])} cap {p['max_think_tokens']}"


def _name(budget: float | str) -> str:
    return budget if isinstance(budget, str) else f"{budget:g}"


@torch.inference_mode()
def decode_speed(model, batch: int = 1, prompt_len: int = 32, new_tokens: int = 48, repeats: int = 3) -> float:
    """Cached greedy decode tokens/s of one model (median of repeats, prefill excluded)."""
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    prompts = ids.tolist()

    def run(n):
        t0 = time.perf_counter()
        generate(model, prompts, GenerationConfig(max_new_tokens=n))
        return time.perf_counter() - t0

    run(2)
    per_token = sorted((run(new_tokens) - run(1)) / (new_tokens - 1) for _ in range(repeats))[repeats // 2]
    return batch / per_token


def sweep(server: ElasticServer, examples: list[dict], caps: list[int], batch_size: int = 100,
          progress: bool = True, timing_rounds: int = 3) -> list[dict]:
    """Every (think, answer) pair of trained budgets at every think cap; think = answer is the
    one-budget baseline (budget 1 is the parent's default budget control).

    Latency is the median over `timing_rounds` passes that visit the configurations in turn, so
    that slow spells of the machine do not land on one configuration only.
    """
    budgets = server.variants
    configs = [BudgetConfig(b, b, c) for b in budgets for c in caps]
    configs += [BudgetConfig(t, a, c) for t in budgets for a in budgets if t != a for c in caps]
    bar = tqdm(total=len(configs) * timing_rounds, desc="budget sweep", file=sys.stderr, disable=not progress)
    points, times = [], [[] for _ in configs]
    for i, c in enumerate(configs):
        points.append(evaluate_config(server, examples, c, batch_size))
        times[i].append(points[-1]["latency_s"])
        bar.update()
    for _ in range(timing_rounds - 1):
        for i, c in enumerate(configs):
            times[i].append(evaluate_config(server, examples, c, batch_size)["latency_s"])
            bar.update()
    bar.close()
    for p, t in zip(points, times):
        p["latency_s"] = sorted(t)[len(t) // 2]
        p["latency_rounds"] = t
    for p, on in zip(points, pareto_front(points)):
        p["on_front"] = on
    return points


def plot_front(points: list[dict], parent: dict, path: Path, title: str = "Accuracy vs latency") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    kinds = {"one budget (think = answer)": lambda p: p["think_budget"] == p["answer_budget"],
             "small think → large answer": lambda p: p["think_budget"] < p["answer_budget"],
             "large think → small answer": lambda p: p["think_budget"] > p["answer_budget"]}
    caps = sorted({p["max_think_tokens"] for p in points}, reverse=True)
    markers = dict(zip(caps, "o^sDv<>"))
    for (name, keep), colour in zip(kinds.items(), ("tab:gray", "tab:blue", "tab:green")):
        for cap in caps:
            sel = [p for p in points if keep(p) and p["max_think_tokens"] == cap]
            ax.scatter([p["latency_s"] for p in sel], [p["accuracy"] for p in sel], c=colour, marker=markers[cap],
                       s=28, alpha=0.8, label=f"{name}, cap {cap}")
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["latency_s"])
    ax.plot([p["latency_s"] for p in front], [p["accuracy"] for p in front], c="tab:red", lw=1.5, label="Pareto front")
    labelled = [p for p in front if _label(p) != _label(parent)]  # the parent default has its own label
    for i, p in enumerate(labelled):  # only the front is labelled; alternate sides so neighbours do not collide
        ax.annotate(_label(p), (p["latency_s"], p["accuracy"]), fontsize=7, textcoords="offset points",
                    xytext=(6, -12 if i % 2 else 6), arrowprops=dict(arrowstyle="-", lw=0.5, color="0.4"))
    ax.annotate(f"parent default: {_label(parent)}", (parent["latency_s"], parent["accuracy"]), fontsize=7,
                textcoords="offset points", xytext=(8, 10), arrowprops=dict(arrowstyle="-", lw=0.5, color="0.4"))
    ax.scatter([parent["latency_s"]], [parent["accuracy"]], marker="*", s=220, c="gold", edgecolors="k",
               zorder=5, label="parent default")
    ax.margins(x=0.06, y=0.12)  # room for the labels inside the axes
    ax.set_xlabel("latency per query (s, batched)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
