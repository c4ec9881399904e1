"""The paper's comparisons at equal footing: what one elastic run buys over training each size alone.

For every budget b < 1 of an elastic run, with A_b the architecture the trained router picks for b:
  independent               A_b trained from scratch with the parent's recipe and budget
                            (same steps, batch and data: `train.parent.train_parent`);
  independent_elastic_tokens  the same with its steps cut so that its tokens equal the elastic run's
                            tokens per size (its schedule compressed to those steps);
  compression_equal_tokens  the sorted parent sliced to A_b, distilled alone from the parent with
                            the elastic run's tokens divided among its sizes (equal total compute);
  compression_to_match      the same slice distilled alone until it reaches the elastic model's
                            accuracy at b (evaluated every `eval_every` steps, up to `match_tokens_factor`
                            times the elastic run's total tokens) → tokens to match ÷ the elastic run's
                            tokens per size.
A token is one real (non-padding) position of a packed training row, counted the same way for every
run; the compressions read the elastic run's token store (RUN/data, or its --data store) with its
stage samplers, as elastify does.
Each result is written to OUT/baselines/<kind>-<b>.json and reused when the demo runs again.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from star_elastic.config import from_dict
from star_elastic.elastic.arch import slice_model
from star_elastic.elastic.run import load_elastic
from star_elastic.train.distill import kd_loss
from star_elastic.train.elastify import (
    ElastifyConfig, kd_positions, lr_scale, open_store, pad_id, stage_of, stage_samplers,
)
from star_elastic.train.parent import ParentConfig, evaluate, train_parent

KINDS = ("independent", "independent_elastic_tokens", "compression_equal_tokens", "compression_to_match")


@dataclasses.dataclass
class BaselineConfig:
    eval_every: int = 100
    """compression_to_match: steps between accuracy checks."""
    match_tokens_factor: float = 1.0
    """compression_to_match stops unmatched after this many times the elastic run's total tokens."""
    eval_batch_size: int = 300
    max_new_tokens: int = 96


def run_tokens(run: Path) -> int:
    """Tokens the elastic run in `run` trained on: the sum of its metrics' per-step counts."""
    return sum(json.loads(line)["tokens"] for line in (run / "metrics.jsonl").read_text().splitlines())


def distill_alone(student, teacher, store, cfg: ElastifyConfig, steps: int, check=None, every: int = 0) -> dict:
    """Distill `student` from the frozen `teacher` for `steps` steps with elastify's data (its stage
    samplers over `store`, KD at the same positions), optimizer and schedule (warmup + cosine over
    `steps`). `check(step)` → True stops early (evaluated every `every`)."""
    cfg = dataclasses.replace(cfg, steps=steps)
    samplers = stage_samplers(cfg, store, pad_id(student))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    student.train()
    tokens, done = 0, 0
    for step in tqdm(range(steps), desc="distill alone", file=sys.stderr, leave=False, dynamic_ncols=True):
        rows = samplers[stage_of(cfg, step)].next_rows(cfg.batch_size)
        with torch.no_grad():
            target = teacher(rows.ids, seq_idx=rows.seq_idx)  # (B, T, V)
        loss = kd_loss(student(rows.ids, seq_idx=rows.seq_idx), target, kd_positions(rows.mask), cfg.kd_temperature)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_scale(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        tokens, done = tokens + int(rows.real.sum()), step + 1
        if check is not None and every and done % every == 0 and check(done):
            break
    student.eval()
    return {"steps": done, "tokens": tokens}


def _accuracy(model, examples: list[dict], bcfg: BaselineConfig) -> float:
    pcfg = ParentConfig(eval_batch_size=bcfg.eval_batch_size, max_new_tokens=bcfg.max_new_tokens)
    return evaluate(model, model.tokenizer, examples, pcfg, desc="baseline eval")["accuracy"]


def _cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def independent(arch_config, parent_cfg: ParentConfig, examples: list[dict], bcfg: BaselineConfig, out: Path,
                steps: int | None = None) -> dict:
    """The budget's architecture trained from scratch with the parent's recipe (steps, batch, data, seed),
    or with `steps` instead of the recipe's; vocabulary and special token ids come from the tokenizer,
    as for the parent."""
    cfg = dataclasses.replace(parent_cfg, model=arch_config, width_scale=1.0, steps=steps or parent_cfg.steps)
    model, report = train_parent(cfg, out)
    return {"steps": report["steps"], "tokens": report["tokens"], "accuracy": _accuracy(model, examples, bcfg)}


def compression(run: Path, budget: float, ecfg: ElastifyConfig, store, steps: int, examples: list[dict],
                bcfg: BaselineConfig, target: float | None = None) -> dict:
    """The sorted parent (RUN/initial) sliced to the trained run's architecture at `budget`, distilled
    alone from the parent; with `target`, stopped at the first check whose accuracy reaches it."""
    trained, initial = load_elastic(run), load_elastic(run / "initial")
    arch = trained.architecture(budget)
    teacher = initial.model.eval().requires_grad_(False)  # the sorted parent computes what the parent does
    # a slice may share storage with the teacher's tensors (an axis kept whole is not copied)
    student = copy.deepcopy(slice_model(initial.model, arch)).requires_grad_(True)
    student.tokenizer = initial.model.tokenizer
    torch.manual_seed(ecfg.seed)
    checks: list[tuple[int, float]] = []

    def reached(step: int) -> bool:
        checks.append((step, _accuracy(student, examples, bcfg)))
        student.train()
        return checks[-1][1] >= target

    result = distill_alone(student, teacher, store, ecfg, steps, reached if target is not None else None,
                           bcfg.eval_every)
    accuracy = checks[-1][1] if checks and checks[-1][0] == result["steps"] else _accuracy(student, examples, bcfg)
    return {**result, "accuracy": accuracy, "checks": checks,
            **({"target": target, "matched": accuracy >= target} if target is not None else {})}


def run_baselines(out: Path, parent_cfg: ParentConfig, elastify_cfg: ElastifyConfig, elastic_rows: list[dict],
                  examples: list[dict], bcfg: BaselineConfig, log=print) -> dict:
    """Every baseline for every budget < 1 of OUT/run; `elastic_rows` hold the run's accuracy per budget."""
    run = out / "run"
    ecfg = dataclasses.replace(elastify_cfg, model=str(out / "parent"), out=str(run))
    elastic = load_elastic(run)
    store = open_store(ecfg, elastic.model, log=log)  # the run's own (prepared into RUN/data, or its store)
    budgets = elastic.ecfg.budgets
    elastic_tokens = run_tokens(run)
    share = elastic_tokens / len(budgets)
    per_step = elastic_tokens / ecfg.steps  # mean tokens of one elastify step
    share_steps = max(1, round(share / per_step))
    match_steps = max(1, round(bcfg.match_tokens_factor * elastic_tokens / per_step))
    accuracy = {r["budget"]: r["accuracy"] for r in elastic_rows}
    result = {"elastic": {"steps": ecfg.steps, "tokens": elastic_tokens, "sizes": len(budgets),
                          "tokens_per_size": share}, **{k: [] for k in KINDS}}
    folder = out / "baselines"
    for b in (b for b in budgets if b < 1.0):
        arch_config = elastic.architecture(b).model_config(elastic.config)
        entry = {"budget": b, "active_params": elastic.describe(b)["active_params"],
                 "elastic_accuracy": accuracy[b]}
        log(f"baselines: budget {b:g}")
        done: dict[str, dict] = {}

        def at_elastic_tokens() -> dict:
            # the recipe's tokens per step, as the full independent run counted them
            per_parent_step = done["independent"]["tokens"] / done["independent"]["steps"]
            steps = max(1, round(share / per_parent_step))
            return independent(arch_config, parent_cfg, examples, bcfg, folder / f"independent_elastic_tokens-{b:g}", steps)

        runs = {
            "independent": lambda: independent(arch_config, parent_cfg, examples, bcfg, folder / f"independent-{b:g}"),
            "independent_elastic_tokens": at_elastic_tokens,
            "compression_equal_tokens": lambda: compression(run, b, ecfg, store, share_steps, examples, bcfg),
            "compression_to_match": lambda: compression(run, b, ecfg, store, match_steps, examples, bcfg, accuracy[b]),
        }
        for kind, make in runs.items():
            res = done[kind] = _cached(folder / f"{kind}-{b:g}.json", make)
            row = {**entry, **res}
            if kind == "compression_to_match":
                row["tokens_to_match_ratio"] = res["tokens"] / share if res["matched"] else None
                row["tokens_ratio_lower_bound"] = res["tokens"] / share
            result[kind].append(row)
    return result
