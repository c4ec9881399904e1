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

from star_elastic.config import ConfigError, typed_blocks
from star_elastic.data import synthetic
from star_elastic.data.tokenizer import format_prompt
from star_elastic.infer.budget import ElasticServer, PhaseConfig, variant_label
from star_elastic.infer.generate import GenerationConfig, generate
from star_elastic.runtime import check_device


@dataclasses.dataclass
class EvalConfig:
    """`star-elastic eval`: accuracy and latency of budgets and budget-control configurations."""

    run: str = ""
    """An elastic run folder, or a sorted checkpoint folder with --arch-file."""
    data: str | None = None
    """jsonl of {prompt, answer} records (default: the built-in test split)."""
    n_test: int = 300
    """Problems of the built-in test split."""
    arch_file: str | None = None
    """Explicit architectures instead of the router (JSON, as for slice); "full" is always there."""
    phases: PhaseConfig = dataclasses.field(default_factory=PhaseConfig)
    """One configuration (--think / --answer; default: every budget alone) and the caps."""
    sweep: tuple[int, ...] = ()
    """Budget-control sweep over these think caps, e.g. 96,32,20: every (think, answer) pair at each."""
    batch_size: int = 100
    """Problems per batch."""
    plot: str | None = None
    """PNG of the accuracy-latency front (with --sweep)."""
    device: str = "auto"
    """auto (CUDA where present), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        typed_blocks(self)
        check_device(self.device)
        if not self.run:
            raise ConfigError("eval needs RUN_OR_CKPT")
        if self.n_test <= 0 or self.batch_size <= 0 or any(c < 0 for c in self.sweep):
            raise ConfigError(f"n_test and batch_size must be positive and sweep caps >= 0, got {self.n_test}, "
                              f"{self.batch_size}, {list(self.sweep)}")
        if self.plot and not self.sweep:
            raise ConfigError("--plot draws the sweep's front: give --sweep CAPS too")
        if self.sweep and (self.phases.think is not None or self.phases.answer is not None):
            raise ConfigError("--sweep evaluates every (think, answer) pair; drop --think / --answer")


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
    if cfg.think_budget != cfg.answer_budget:
        return evaluate_answers(server, examples, cfg.think_budget, cfg.max_think_tokens, [cfg.answer_budget],
                                batch_size, max_answer_tokens)[0]
    tally = _Tally(cfg)
    for chunk, prompts in _batches(server, examples, batch_size):
        run = server.generate(prompts, cfg.think_budget, cfg.answer_budget, cfg.max_think_tokens, max_answer_tokens)
        tally.add(server, chunk, [(r.think_tokens, r.answer_tokens) for r in run.results],
                  run.think_seconds, run.answer_seconds)
    return tally.point(len(examples), batch_size)


def evaluate_answers(server: ElasticServer, examples: list[dict], think_budget: float | str, max_think_tokens: int,
                     answer_budgets: list[float | str], batch_size: int = 100, max_answer_tokens: int = 24) -> list[dict]:
    """(think_budget → a, max_think_tokens) for every answer budget a ≠ think_budget, thinking once:
    each batch's traces (greedy, so the same for every answerer) are decoded once and answered by
    every budget in turn. Each configuration's latency is the shared think time plus its own answer
    time, as if it ran alone."""
    if think_budget in answer_budgets:
        raise ConfigError(f"think budget {think_budget} answers in place (evaluate_config), not from a shared trace")
    tallies = [_Tally(BudgetConfig(think_budget, a, max_think_tokens)) for a in answer_budgets]
    for chunk, prompts in _batches(server, examples, batch_size):
        t0 = time.perf_counter()
        thinks, _ = server.think(prompts, think_budget, max_think_tokens)
        think_s = time.perf_counter() - t0
        for a, tally in zip(answer_budgets, tallies):
            t1 = time.perf_counter()
            answers = server.answer(thinks, a, max_answer_tokens)
            tally.add(server, chunk, [(t.tokens, r.tokens) for t, r in zip(thinks, answers)], think_s,
                      time.perf_counter() - t1)
    return [tally.point(len(examples), batch_size) for tally in tallies]


def _batches(server: ElasticServer, examples: list[dict], batch_size: int):
    tok = server.parent.tokenizer
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield chunk, [tok.encode(format_prompt(tok, ex["prompt"]), add_special_tokens=False) for ex in chunk]


class _Tally:
    """Exact-match answers, token counts and phase times of one configuration, batch by batch."""

    def __init__(self, cfg: BudgetConfig):
        self.cfg, self.correct, self.latencies = cfg, [], []
        self.think_tokens = self.answer_tokens = 0
        self.think_s = self.answer_s = 0.0

    def add(self, server: ElasticServer, chunk: list[dict], outputs: list[tuple[list[int], list[int]]],
            think_s: float, answer_s: float) -> None:
        tok = server.parent.tokenizer
        for ex, (think, answer) in zip(chunk, outputs):
            text = "<think>" + tok.decode(think + answer, skip_special_tokens=False)
            self.correct.append(synthetic.check_answer(text, ex["answer"]))
            self.think_tokens += len(think)
            self.answer_tokens += len(answer)
        self.latencies += [think_s + answer_s] * len(chunk)
        self.think_s += think_s
        self.answer_s += answer_s

    def point(self, n_examples: int, batch_size: int) -> dict:
        n = max(1, n_examples)
        return {
            "think_budget": self.cfg.think_budget, "answer_budget": self.cfg.answer_budget,
            "max_think_tokens": self.cfg.max_think_tokens,
            "accuracy": sum(self.correct) / n, "latency_s": sum(self.latencies) / n,
            "think_tokens": self.think_tokens / n, "answer_tokens": self.answer_tokens / n,
            "tokens_per_s": (self.think_tokens + self.answer_tokens) / max(1e-9, self.think_s + self.answer_s),
            "think_seconds": self.think_s, "answer_seconds": self.answer_s, "n": n_examples, "batch_size": batch_size,
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
    return f"{variant_label(p['think_budget'])}→{variant_label(p['answer_budget'])} cap {p['max_think_tokens']}"


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
          progress: bool = True, timing_rounds: int = 2, max_answer_tokens: int = 24) -> list[dict]:
    """Every (think, answer) pair of trained budgets at every think cap; think = answer is the
    one-budget baseline (budget 1 is the parent's default budget control).

    Each thinker's trace at each cap is decoded once and answered by every budget
    (`evaluate_answers`). Latency is the fastest of `timing_rounds` passes that visit the
    configurations in turn: the round least disturbed by the machine's other work.
    """
    budgets = server.variants
    # one pass per thinker and cap: its in-place configuration, then its trace answered by every other budget
    passes = [(b, c) for b in budgets for c in caps]
    bar = tqdm(total=2 * len(passes) * timing_rounds, desc="budget sweep", file=sys.stderr, disable=not progress)
    rounds = []
    for _ in range(timing_rounds):
        points = []
        for b, c in passes:
            points.append(evaluate_config(server, examples, BudgetConfig(b, b, c), batch_size, max_answer_tokens))
            bar.update()
            others = [a for a in budgets if a != b]
            points += evaluate_answers(server, examples, b, c, others, batch_size, max_answer_tokens) if others else []
            bar.update()
        rounds.append(points)
    bar.close()
    key = lambda p: (p["think_budget"] != p["answer_budget"], budgets.index(p["think_budget"]),  # noqa: E731
                     budgets.index(p["answer_budget"]), caps.index(p["max_think_tokens"]))
    points = rounds[0]  # every round visits the configurations in the same order
    for i, p in enumerate(points):
        t = [r[i]["latency_s"] for r in rounds]
        p["latency_s"], p["latency_rounds"] = min(t), t
    points.sort(key=key)  # the one-budget configurations first, then thinker, answerer, cap as given
    for p, on in zip(points, pareto_front(points)):
        p["on_front"] = on
    return points


def accuracy_limits(accuracies: list[float]) -> tuple[float, float]:
    """y-axis limits for accuracies: their range with room for labels (12 %, at least 0.05), within [0, 1]."""
    lo, hi = min(accuracies), max(accuracies)
    pad = max(0.05, 0.12 * (hi - lo))
    return max(0.0, lo - pad), min(1.0, hi + pad)


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
    ax.margins(x=0.06)  # room for the labels inside the axes
    ax.set_ylim(*accuracy_limits([p["accuracy"] for p in points]))
    ax.set_xlabel("latency per query (s, batched)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
