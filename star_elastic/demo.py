"""The one-command demo: the whole Star Elastic story on a small reasoning model trained on CPU.

    star-elastic demo --out DIR [--quick] [--baselines]

the converged parent shipped in the package (or --parent-model) → importance + sort → elastic training
→ slice every budget → evaluate → budget-control sweep → FP8 / NVFP4 quantization → [baselines]
→ DIR/report.json, report.md and plots.
Every stage reuses what DIR already holds, so an interrupted demo continues where it stopped.
All work is fixed (steps, problems, seeds), so the accuracies do not depend on the machine's speed;
only the timings do. Latency and decode speed are measured at batch `eval_batch_size`, where a
model this small is bound by compute rather than per-op overhead.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from star_elastic.accounting import count_params
from star_elastic.assets import PARENT, sha256
from star_elastic.baselines import KINDS, BaselineConfig, run_baselines
from star_elastic.config import ModelConfig, check_out_dir, from_dict, typed_blocks
from star_elastic.elastic.arch import slice_model
from star_elastic.elastic.run import load_elastic
from star_elastic.hf import save_model
from star_elastic.infer.budget import ElasticServer
from star_elastic.infer.evaluate import (
    BudgetConfig, decode_speed, evaluate_config, headline, load_eval_examples, plot_front, small_think_large_answer,
    sweep,
)
from star_elastic.infer.views import view_model
from star_elastic.quant.qad import QuantizeConfig, quantize_run
from star_elastic.slicing import slice_run
from star_elastic.train.elastify import ElastifyConfig
from star_elastic.train.elastify import train as elastify
from star_elastic.train.parent import ParentConfig


@dataclasses.dataclass
class DemoConfig:
    """Embedded defaults of the demo; `quick` shrinks everything to a toy run."""

    out: str = "demo_out"
    """Output folder; stages found done there are reused (an interrupted demo continues)."""
    quick: bool = False
    """Toy sizes, about a minute: a smoke test of the pipeline (used by the tests), not a result."""
    baselines: bool = False
    """Also train every budget alone: independent (the parent's recipe, and cut to the elastic run's
    tokens per size), compression at equal tokens, compression to match."""

    parent_model: str = ""
    """Parent folder (transformers nemotron_h layout, tokenizer included); empty: the converged parent
    shipped in the package (star_elastic/assets/parent, trained with configs/parent.yaml)."""
    parent: ParentConfig = dataclasses.field(default_factory=ParentConfig)
    """The recipe the independent baselines train each size with (train-parent's keys; the defaults
    are the shipped parent's recipe)."""
    elastify: ElastifyConfig = dataclasses.field(
        default_factory=lambda: ElastifyConfig(
            data="synthetic", steps=600, batch_size=24, lr=1e-3, stage1_seq_len=128, stage2_probs=(0.2, 0.3, 0.5),
            budget_sampling="micro_batch", engine={"micro_batch_size": 8}))
    """The elastification (elastify's keys; model, out and data are the demo's; configs/elastify.yaml
    writes it out). A budget per micro-batch of 8 rows (3 per step): at equal CPU time it beats one
    budget per step and every budget per step at the smallest budget (README, "Budgets per step").
    Stage 2 samples the smallest budget most: it learns slowest."""
    n_test: int = 300
    eval_batch_size: int = 300
    """Queries per batch for accuracy, latency and decode speed (one batch: compute-bound timings)."""
    think_caps: tuple[int, ...] = (64, 40, 24)
    """Think-token caps of the sweep; the largest (above every trace) is the cap of the per-budget tables."""
    timing_rounds: int = 2
    """Passes over the sweep's configurations; each latency is the fastest of its rounds."""
    qad_steps: int = 60
    formats: tuple[str, ...] = ("fp8", "nvfp4")
    baseline: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)
    """How the baselines are trained and evaluated (used with --baselines)."""
    min_parent_accuracy: float = 0.9
    """The report draws conclusions (headline, what it shows) only from a parent at least this
    accurate on its test split, and never in a quick run (a smoke test of the pipeline)."""

    def __post_init__(self) -> None:
        typed_blocks(self)


QUICK = DemoConfig(
    parent=dict(steps=30, n_train=3000, n_test=40, eval_batch_size=40, max_new_tokens=64, warmup_steps=5),
    elastify=dict(data="synthetic", steps=12, batch_size=8, n_synthetic=500, calibration_batches=2, router_fit_steps=60,
                  stage1_seq_len=48, stage2_seq_len=64),
    n_test=24, eval_batch_size=24, think_caps=(64, 16), timing_rounds=2, qad_steps=4,
    baseline=dict(eval_every=4, eval_batch_size=24, max_new_tokens=64),
)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _done_file(out: Path, stage: str) -> Path:
    """The file whose presence means `stage` ("parent" or "elastify") is done in `out` and is reused."""
    return {"parent": out / "parent" / "demo_parent.json", "elastify": out / "run" / "elastify_summary.json"}[stage]


def stage_parent(cfg: DemoConfig, out: Path) -> dict:
    """Copy the parent into DIR/parent (the run and the baselines read it there) and describe it: its
    SHA-256, size, and, when it has a train_report.json (the shipped one does), how it was trained
    and its accuracy on its own test split. Its accuracy on the demo's problems is measured later."""
    source = Path(cfg.parent_model) if cfg.parent_model else PARENT
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"demo: parent_model {source} has no config.json (a transformers nemotron_h folder)")
    parent_dir, done = out / "parent", _done_file(out, "parent")
    if done.is_file():
        _log(f"parent: reusing {parent_dir}")
        return json.loads(done.read_text())
    _log(f"parent: {'the converged parent shipped in the package' if not cfg.parent_model else source}")
    if parent_dir.exists():
        shutil.rmtree(parent_dir)  # an interrupted copy
    shutil.copytree(source, parent_dir)
    trained = json.loads((source / "train_report.json").read_text()) if (source / "train_report.json").is_file() else {}
    counts = count_params(ModelConfig.from_json(parent_dir / "config.json"))  # sizes from config.json alone
    info = {"source": "shipped" if not cfg.parent_model else str(source),
            "sha256": sha256(parent_dir / "model.safetensors"),
            "params": counts.total_params, "active_params": counts.active_params,
            "steps": trained.get("steps"), "tokens": trained.get("tokens"),
            "train_seconds": trained.get("train_seconds"),
            "own_test": ({"accuracy": trained["test"]["accuracy"], "n": trained["test"]["n"]}
                         if "test" in trained else None)}
    done.write_text(json.dumps(info, indent=2) + "\n")
    return info


def stage_elastify(cfg: DemoConfig, out: Path) -> dict:
    run = out / "run"
    done = _done_file(out, "elastify")
    if done.is_file():
        _log(f"elastify: reusing {run}")
        return json.loads(done.read_text())
    _log("elastify: importance, sorting, router fit, nested distillation")
    t0 = time.perf_counter()
    ecfg = dataclasses.replace(cfg.elastify, model=str(out / "parent"), out=str(run), save_initial=True, resume="auto")
    summary = elastify(ecfg)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    done.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def evaluate_budgets(run: Path, examples: list[dict], cfg: DemoConfig) -> list[dict]:
    """Each trained budget alone (think = answer = b), uncapped."""
    elastic = load_elastic(run)
    server = ElasticServer.from_elastic(elastic)
    cap = max(cfg.think_caps)
    return [evaluate_config(server, examples, BudgetConfig(b, b, cap), cfg.eval_batch_size) for b in elastic.ecfg.budgets]


def stage_slices(out: Path) -> tuple[list[dict], dict]:
    """Slice every budget to BF16 checkpoints; compare one elastic checkpoint with separate ones."""
    elastic = load_elastic(out / "run")
    slices, separate = [], 0
    bf16_dir = out / "bf16"
    save_model(_bf16(elastic.model), bf16_dir / "elastic")
    for b in elastic.ecfg.budgets:
        info = slice_run(out / "run", b, out / "slices" / f"budget-{b:g}")
        small = slice_model(elastic.model, elastic.architecture(b))
        save_model(_bf16(small), bf16_dir / f"budget-{b:g}")
        separate += _dir_bytes(bf16_dir / f"budget-{b:g}")
        slices.append(info)
    return slices, {"elastic": _dir_bytes(bf16_dir / "elastic"), "separate": separate}


def _bf16(model):
    import copy

    m = copy.deepcopy(model).to(torch.bfloat16)
    m.tokenizer = model.tokenizer
    return m


def stage_speed(out: Path, batch: int) -> list[dict]:
    """Decode tokens/s of each budget's submodel vs the parent's, at batch 1 (per-op overhead
    dominates a model this small) and at the evaluation batch size; served as views of the
    parent's storage (what ElasticServer runs) and, side by side at the evaluation batch, as
    contiguous slices (what `star-elastic slice` writes), to show what the views cost."""
    elastic = load_elastic(out / "run")
    full = count_params(elastic.config)
    rows = []
    for b in elastic.ecfg.budgets:
        arch = elastic.architecture(b)
        views, sliced = view_model(elastic.model, arch), slice_model(elastic.model, arch)
        rows.append({"budget": b, "active_ratio": count_params(views.config).active_params / full.active_params,
                     "decode_tok_s_batch1": decode_speed(views, batch=1),
                     f"decode_tok_s_batch{batch}": decode_speed(views, batch=batch),
                     f"decode_tok_s_batch{batch}_slices": decode_speed(sliced, batch=batch)})
    parent = rows[0]
    for row in rows:
        for key in ("decode_tok_s_batch1", f"decode_tok_s_batch{batch}", f"decode_tok_s_batch{batch}_slices"):
            speedup = row[key] / parent[key]
            row[key.replace("decode_tok_s", "speedup")] = speedup
            row[key.replace("decode_tok_s", "speedup_vs_ideal")] = speedup * row["active_ratio"]
    return rows


def stage_quant(cfg: DemoConfig, out: Path, examples: list[dict], bf16_acc: dict[float, float]) -> dict:
    results = {}
    plans = [(fmt, 0) for fmt in cfg.formats] + [("nvfp4", cfg.qad_steps)]
    for fmt, steps in plans:
        name = f"{fmt}-qad{steps}" if steps else f"{fmt}-ptq"
        qrun = out / "quant" / name
        if not (qrun / "quantize_report.json").is_file():
            _log(f"quantize: {name}")
            quantize_run(from_dict(QuantizeConfig, {"run": str(out / "run"), "out": str(qrun), "resume": "auto",
                                                    "quant": {"format": fmt}, "qad_steps": steps}, source="demo.quant"))
        rows = evaluate_budgets(qrun, examples, cfg)
        results[name] = {
            "bytes": _dir_bytes(qrun / "model"),
            "budgets": [{"budget": r["think_budget"], "accuracy": r["accuracy"],
                         "recovery": r["accuracy"] / bf16_acc[r["think_budget"]] if bf16_acc[r["think_budget"]] else None}
                        for r in rows],
            "report": json.loads((qrun / "quantize_report.json").read_text()),
        }
    return results


def stage_evaluate(cfg: DemoConfig, out: Path, examples: list[dict]) -> dict:
    """Every budget before and after elastic training, slices, decode speed, and the budget-control
    sweep; kept in DIR/evaluation.json (with the seconds each part took) and reused."""
    path = out / "evaluation.json"
    if path.is_file():
        _log(f"evaluate: reusing {path}")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    _log("evaluate: every budget before and after elastic training")
    ev = {"before": evaluate_budgets(out / "run" / "initial", examples, cfg),
          "after": evaluate_budgets(out / "run", examples, cfg)}
    ev["slices"], ev["checkpoint_bytes"] = stage_slices(out)
    ev["speeds"] = stage_speed(out, cfg.eval_batch_size)
    t1 = time.perf_counter()
    _log("budget-control sweep")
    server = ElasticServer.from_elastic(load_elastic(out / "run"))
    ev["points"] = sweep(server, examples, sorted(cfg.think_caps, reverse=True), cfg.eval_batch_size,
                         timing_rounds=cfg.timing_rounds)
    ev["seconds"] = {"evaluate": t1 - t0, "sweep": time.perf_counter() - t1}
    path.write_text(json.dumps(ev, indent=2) + "\n")
    return ev


def stage_baselines(cfg: DemoConfig, out: Path, after: list[dict], examples: list[dict]) -> dict:
    return run_baselines(out, cfg.parent, cfg.elastify, after, examples, cfg.baseline, log=_log)


def _timed(timings: dict, name: str, fn, *args):
    t = time.perf_counter()
    result = fn(*args)
    timings[name] = time.perf_counter() - t
    return result


def run_demo(cfg: DemoConfig) -> dict:
    """The whole story into `cfg.out`; `cfg.quick` runs the embedded toy sizes instead of `cfg`'s."""
    if cfg.quick:
        cfg = dataclasses.replace(QUICK, out=cfg.out, quick=True, baselines=cfg.baselines)
    out, quick, baselines = Path(cfg.out), cfg.quick, cfg.baselines
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings = {}
    reused = [stage for stage in ("elastify",) if _done_file(out, stage).is_file()]
    parent_info = _timed(timings, "parent", stage_parent, cfg, out)
    elastify_summary = _timed(timings, "elastify", stage_elastify, cfg, out)
    examples = load_eval_examples(None, cfg.n_test)
    ev = stage_evaluate(cfg, out, examples)
    before, after, slices, checkpoint_bytes, speeds, points = (
        ev[k] for k in ("before", "after", "slices", "checkpoint_bytes", "speeds", "points"))
    timings.update(ev["seconds"])  # as measured when computed (a reused evaluation keeps its times)
    parent_point = next(p for p in points if p["think_budget"] == p["answer_budget"] == 1.0
                        and p["max_think_tokens"] == max(cfg.think_caps))
    bf16_acc = {r["think_budget"]: r["accuracy"] for r in after}
    quant = _timed(timings, "quantization", stage_quant, cfg, out, examples, bf16_acc)
    if baselines:
        _log("baselines: independent training and per-size compression")
        rows = [{"budget": r["think_budget"], "accuracy": r["accuracy"]} for r in after]
        base = _timed(timings, "baselines", stage_baselines, cfg, out, rows, examples)

    budgets = []
    for info, b0, b1, sp in zip(slices, before, after, speeds):
        budgets.append({
            "budget": info["budget"], "architecture": info["architecture"], "total_params": info["total_params"],
            "active_params": info["active_params"], "relative_cost": info["relative_cost"],
            "target": info["target"], "achieved": info["achieved"], "budget_type": info["budget_type"],
            "budget_mode": info["budget_mode"], "held": info["held"], "active_fraction": sp["active_ratio"],
            "accuracy": b1["accuracy"], "accuracy_before_training": b0["accuracy"], "latency_s": b1["latency_s"],
            "tokens_per_s": b1["tokens_per_s"], **{k: v for k, v in sp.items() if k != "budget"},
        })
    earlier = {"elastify": elastify_summary.get("seconds")}
    # the sorted parent is the parent (a permutation), so budget 1 before training is the parent's accuracy here
    parent_acc = next(r["accuracy"] for r in before if r["think_budget"] == 1.0)
    conclusive = not quick and parent_acc >= cfg.min_parent_accuracy
    report = {
        "quick": quick,
        "conclusions": conclusive,
        "min_parent_accuracy": cfg.min_parent_accuracy,
        "parent": {**parent_info, "accuracy": parent_acc, "n_test": len(examples)},
        "budgets": budgets,
        "budget_control": [{k: p[k] for k in ("think_budget", "answer_budget", "max_think_tokens", "accuracy",
                                               "latency_s", "think_tokens", "answer_tokens", "on_front")} for p in points],
        "headline": headline(points, parent_point) if conclusive else None,
        "small_think_large_answer": small_think_large_answer(points),
        "checkpoint_bytes": checkpoint_bytes,
        "quantization": quant,
        "elastify_seconds": elastify_summary.get("seconds"),
        "eval": {"n_test": len(examples), "batch_size": cfg.eval_batch_size, "think_caps": list(cfg.think_caps)},
        "elastify_steps": cfg.elastify.steps,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "reused_stages_s": {name: earlier[name] for name in reused},
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    if baselines:
        report["baselines"] = base
        plot_baselines(report, out / "baselines.png")
    report["claims"] = claims(report)
    plot_front(points, parent_point, out / "pareto.png")
    plot_budgets(budgets, report["parent"]["accuracy"], out / "budgets.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    _log(f"done in {report['wall_seconds']} s → {out / 'report.md'}")
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_budgets(budgets: list[dict], parent_acc: float, path: Path) -> None:
    """Accuracy against the achieved fraction of active parameters; the targets as dotted lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [b["active_fraction"] for b in budgets]
    ax.plot(xs, [b["accuracy_before_training"] for b in budgets], "o--", c="tab:gray", label="sliced after sorting")
    ax.plot(xs, [b["accuracy"] for b in budgets], "o-", c="tab:blue", label="after elastic training")
    for i, b in enumerate(budgets):
        ax.axvline(b["budget"], c="0.6", ls=":", lw=1, label="target budget" if i == 0 else None)
    ax.set_xticks(xs, [f"{b['active_fraction']:.3f}\n(target {b['budget']:g})" for b in budgets], fontsize=8)
    ax.set_xlim(min(xs + [b["budget"] for b in budgets]) - 0.08, 1.05)
    ax.axhline(parent_acc, color="k", ls="--", lw=1, label="parent")
    ax.set_xlabel("achieved fraction of the parent's active parameters")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_baselines(report: dict, path: Path) -> None:
    """Accuracy per budget: the elastic model against the three per-size baselines."""
    plt = _pyplot()
    base = report["baselines"]
    budgets = [row["budget"] for row in base["independent"]]
    series = {"elastic (one run)": [row["elastic_accuracy"] for row in base["independent"]],
              **{kind.replace("_", " "): [row["accuracy"] for row in base[kind]] for kind in KINDS}}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (name, accs) in enumerate(series.items()):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(budgets))], accs, width, label=name)
    ax.axhline(report["parent"]["accuracy"], color="k", ls="--", lw=1, label="parent")
    achieved = {b["budget"]: b["active_fraction"] for b in report["budgets"]}
    ax.set_xticks(range(len(budgets)), [f"{achieved[b]:.3f}\n(target {b:g})" for b in budgets])
    ax.set_xlabel("achieved fraction of the parent's active parameters")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def render_markdown(r: dict) -> str:
    lines = ["# star-elastic demo report", ""]
    p = r["parent"]
    if r["quick"]:
        lines += ["**A smoke test of the pipeline, not a result.** `demo --quick` runs every stage with a few "
                  "steps each and a few problems, to show that the stages run end to end; its accuracies, speeds "
                  "and sizes say nothing about the method. `star-elastic demo` (without --quick) gives the results.",
                  ""]
    lines += [_parent_line(p), ""]
    nb = r["eval"]["batch_size"]
    kind = r["budgets"][0]["budget_type"]
    lines += ["## Nested models", "", f"| budget | {kind}: target → achieved | total params | active params | "
              f"accuracy before training | accuracy after | latency/query (s) | decode tok/s batch 1 | "
              f"decode tok/s batch {nb}: views / slices | speedup batch {nb} × active ratio (1 = in proportion): "
              f"views / slices |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in r["budgets"]:
        held = f" (outside the {b['budget_mode']} window)" if b["held"] is False else ""
        lines.append(f"| {b['budget']:g} | {b['target']:.3f} → {b['achieved']:.3f}{held} | {b['total_params']:,} | "
                     f"{b['active_params']:,} | "
                     f"{b['accuracy_before_training']:.1%} | {b['accuracy']:.1%} | {b['latency_s']:.3f} | "
                     f"{b['decode_tok_s_batch1']:.0f} | {b[f'decode_tok_s_batch{nb}']:.0f} / "
                     f"{b[f'decode_tok_s_batch{nb}_slices']:.0f} | "
                     f"{b[f'speedup_vs_ideal_batch{nb}']:.2f} / "
                     f"{b[f'speedup_vs_ideal_batch{nb}_slices']:.2f} |")
    lines += ["", "![accuracy per budget](budgets.png)", "", "## Budget control", "",
              "Budgets are named by their target; achieved " + kind + ": "
              + ", ".join(f"{b['budget']:g} → {b['achieved']:.3f}" for b in r["budgets"]) + ".", "",
              "| think → answer | think cap | accuracy | latency/query (s) | think tokens | on front |",
              "|---|---|---|---|---|---|"]
    for q in r["budget_control"]:
        lines.append(f"| {q['think_budget']:g} → {q['answer_budget']:g} | {q['max_think_tokens']} | {q['accuracy']:.1%} "
                     f"| {q['latency_s']:.3f} | {q['think_tokens']:.1f} | {'yes' if q['on_front'] else ''} |")
    lines += ["", "![Pareto front](pareto.png)", ""]
    lines += _headline_lines(r) if r["conclusions"] else [_withheld(r)]
    cb = r["checkpoint_bytes"]
    lines += ["", "## Checkpoints and quantization", "",
              f"One BF16 elastic checkpoint: {cb['elastic']:,} bytes; the separate BF16 slices together: "
              f"{cb['separate']:,} bytes ({cb['separate'] / cb['elastic']:.2f}x).", "",
              "| checkpoint | bytes | vs BF16 elastic | held-out KD after PTQ → final | "
              + " | ".join(f"budget {b['budget']:g} acc (recovery)" for b in r["budgets"]) + " |",
              "|---|---|---|---|" + "---|" * len(r["budgets"])]
    for name, q in r["quantization"].items():
        cells = " | ".join(f"{x['accuracy']:.1%} ({x['recovery']:.1%})" if x["recovery"] is not None else f"{x['accuracy']:.1%}"
                           for x in q["budgets"])
        kd = q["report"]
        kd_cell = f"{kd['kd_ptq']:.5f} → {kd['kd_final']:.5f}" if kd["qad_steps"] else f"{kd['kd_ptq']:.5f}"
        lines.append(f"| {name} | {q['bytes']:,} | {q['bytes'] / cb['elastic']:.2f} | {kd_cell} | {cells} |")
    if "baselines" in r:
        lines += _baseline_lines(r["baselines"], {b["budget"]: b["achieved"] for b in r["budgets"]}, kind)
    if r["conclusions"]:
        lines += _claim_lines(r)
    lines += ["", _wall_time_line(r), ""] + ([_story(r), ""] if r["conclusions"] else [])
    return "\n".join(lines)


def claims(r: dict) -> list[dict]:
    """The method's claims as measured by this run, each with its numbers and whether it holds:
    budget 1 keeps the parent's accuracy (within 1 point), every budget is held, and with baselines
    every smaller budget is as good as its independently trained twin (within 2 points) and as
    compression at equal tokens, while compressing each size alone needs ≥ 2x the tokens to match."""
    rows = []
    full = next(b for b in r["budgets"] if b["budget"] == 1.0)
    rows.append({"claim": "budget 1 after elastic training ≥ the parent − 1 point",
                 "measured": f"{full['accuracy']:.1%} vs {r['parent']['accuracy']:.1%}",
                 "holds": full["accuracy"] >= r["parent"]["accuracy"] - 0.01 - 1e-9})
    off = [f"{b['budget']:g}" for b in r["budgets"] if b["held"] is False]
    rows.append({"claim": "every budget held within its window",
                 "measured": ", ".join(f"{b['budget']:g} → {b['achieved']:.3f}" for b in r["budgets"]),
                 "holds": not off})
    base = r.get("baselines")
    if base:
        by_kind = {kind: {row["budget"]: row for row in base[kind]} for kind in KINDS}
        for b, twin in by_kind["independent"].items():
            acc = twin["elastic_accuracy"]
            rows.append({"claim": f"budget {b:g} ≥ its independently trained twin − 2 points",
                         "measured": f"{acc:.1%} vs {twin['accuracy']:.1%}",
                         "holds": acc >= twin["accuracy"] - 0.02 - 1e-9})
            equal = by_kind["compression_equal_tokens"][b]
            rows.append({"claim": f"budget {b:g} ≥ compression at equal tokens",
                         "measured": f"{acc:.1%} vs {equal['accuracy']:.1%}", "holds": acc >= equal["accuracy"]})
            match = by_kind["compression_to_match"][b]
            ratio = match["tokens_ratio_lower_bound"]
            rows.append({"claim": f"budget {b:g}: compression alone needs ≥ 2x the elastic tokens per size to match",
                         "measured": f"{ratio:.2f}x" if match["matched"] else f"> {ratio:.2f}x (not matched)",
                         "holds": ratio >= 2})  # unmatched: the tokens spent are a lower bound
    return rows


def _claim_lines(r: dict) -> list[str]:
    lines = ["", "## The method's claims, as measured here", "", "| claim | measured | holds |", "|---|---|---|"]
    return lines + [f"| {c['claim']} | {c['measured']} | {'yes' if c['holds'] else '**no**'} |" for c in r["claims"]]


def _parent_line(p: dict) -> str:
    """Which parent, its SHA-256, how it was trained (when it says) and its accuracy here."""
    name = "the converged parent shipped in the package" if p["source"] == "shipped" else f"`{p['source']}`"
    trained = ""
    if p.get("steps"):
        trained = f", trained {p['steps']:,} steps ({p['tokens']:,} tokens)"
    own = p.get("own_test")
    own_text = f"{own['accuracy']:.1%} on its own {own['n']}-problem test split, " if own else ""
    return (f"Parent: {name} (model.safetensors SHA-256 `{p['sha256'][:16]}…`), {p['params']:,} parameters "
            f"({p['active_params']:,} active){trained}; {own_text}{p['accuracy']:.1%} on the {p['n_test']} "
            "held-out problems of the tables below.")


def _withheld(r: dict) -> str:
    """Why a report compares nothing against the parent."""
    why = ("a quick run is a smoke test" if r["quick"] else
           f"the parent scores {r['parent']['accuracy']:.1%} on the held-out problems, below the "
           f"{r['min_parent_accuracy']:.0%} (DemoConfig.min_parent_accuracy) a comparison with it needs")
    return f"No conclusions are drawn from these numbers: {why}."


def _headline_lines(r: dict) -> list[str]:
    """Small think → large answer at each parent cap, then the headline against the parent's default."""
    lines, h = _small_think_lines(r["small_think_large_answer"]), r["headline"]
    if "at_equal_accuracy" in h:
        a = h["at_equal_accuracy"]
        lines.append(f"- At accuracy ≥ the parent's default ({h['parent']['accuracy']:.1%}): {a['config']} reaches "
                     f"{a['accuracy']:.1%} {_speed(a['latency_reduction'])}.")
    if "at_equal_latency" in h:
        a = h["at_equal_latency"]
        lines.append(f"- At latency ≤ the parent's default: {a['config']} reaches {a['accuracy']:.1%} "
                     f"({a['accuracy_gain'] * 100:+.1f} points).")
    return lines


def _wall_time_line(r: dict) -> str:
    """This run's wall time by stage; a stage reused from an earlier run shows the time it took then."""
    reused = r.get("reused_stages_s", {})
    stages = [f"{k} reused (took {reused[k]} s then)" if k in reused else f"{k} {v} s" for k, v in r["timings_s"].items()]
    return f"Wall time {r['wall_seconds']} s (this run's work); stages: " + ", ".join(stages)


def _speed(reduction: float) -> str:
    """A latency ratio (parent ÷ config) in words: below 1 the configuration is slower."""
    return f"at {reduction:.2f}x lower latency" if reduction >= 1 else f"at {1 / reduction:.2f}x higher latency"


def _small_think_lines(rows: list[dict]) -> list[str]:
    """Small thinker, large answerer against the parent at each of its think caps (paper: +16%, 1.9x)."""
    lines = ["Small think → large answer against the parent (1 → 1) at each of its think caps:", ""]
    for row in rows:
        cells = [f"front points: {', '.join(row['on_front']) or 'none'}"]
        if "at_equal_accuracy" in row:
            a = row["at_equal_accuracy"]
            cells.append(f"at ≥ its accuracy, {a['config']} is {_speed(a['latency_reduction'])}")
        else:
            cells.append("none reaches its accuracy")
        if "at_equal_latency" in row:
            a = row["at_equal_latency"]
            cells.append(f"at ≤ its latency, {a['config']} scores {a['accuracy_gain'] * 100:+.1f} points")
        lines.append(f"- parent cap {row['parent_cap']} ({row['parent']['accuracy']:.1%}, "
                     f"{row['parent']['latency_s']:.3f} s): " + "; ".join(cells) + ".")
    return lines


def _baseline_lines(base: dict, achieved: dict[float, float], budget_type: str) -> list[str]:
    """Every baseline trains the elastic run's architecture for its budget, so it costs what that one achieved."""
    e = base["elastic"]
    lines = ["", "## Baselines", "",
             f"The elastic run: {e['steps']} steps, {e['tokens']:,} tokens for {e['sizes']} sizes "
             f"({e['tokens_per_size']:,.0f} per size).", "",
             f"| budget ({budget_type}: target → achieved) | active params | model | accuracy | steps | tokens | "
             "tokens ÷ elastic tokens per size |",
             "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(base["independent"]):
        budget = f"{row['budget']:g} → {achieved[row['budget']]:.3f}"
        lines.append(f"| {budget} | {row['active_params']:,} | elastic (one run, all sizes) | "
                     f"{row['elastic_accuracy']:.1%} | {e['steps']} | {e['tokens']:,} | {e['sizes']:.2f} |")
        for kind in KINDS:
            x = base[kind][i]
            ratio = f"{x['tokens'] / e['tokens_per_size']:.2f}"
            if kind == "compression_to_match" and not x["matched"]:
                ratio = f"> {ratio} (not matched)"
            lines.append(f"| {budget} | {x['active_params']:,} | {kind} | {x['accuracy']:.1%} | {x['steps']} | "
                         f"{x['tokens']:,} | {ratio} |")
    return lines + ["", "![baselines](baselines.png)"]


def _story(r: dict) -> str:
    """One paragraph stating what the measured numbers show (no claim the numbers do not make)."""
    full = next((b for b in r["budgets"] if b["budget"] == 1.0), None)
    parent = full["accuracy_before_training"] if full else r["parent"]["accuracy"]  # sorted parent == parent
    parts = [f"the full model {full['accuracy']:.1%} after elastic training"] if full else []
    for b in r["budgets"]:
        if b["budget"] == 1.0:
            continue
        lost = parent - b["accuracy_before_training"]
        recovered = (b["accuracy"] - b["accuracy_before_training"]) / lost if lost > 0 else None
        share = f", {recovered:.1%} of the gap to the parent recovered" if recovered is not None else ""
        parts.append(f"budget {b['budget']:g}: {b['accuracy_before_training']:.1%} zero-shot → {b['accuracy']:.1%} "
                     f"after elastic training{share}")
    h, cb = r["headline"], r["checkpoint_bytes"]
    text = (f"What it shows: on these problems the parent scores {parent:.1%}; slicing its sorted weights zero-shot and then training "
            f"all budgets in one run gives " + "; ".join(parts) + ". ")
    if "at_equal_accuracy" in h:
        a = h["at_equal_accuracy"]
        text += (f"Budget control: {a['config']} matches or beats the parent's default accuracy "
                 f"{_speed(a['latency_reduction'])}. ")
    text += (f"All budgets live in one checkpoint ({cb['elastic']:,} bytes in BF16, vs {cb['separate']:,} for "
             f"separate slices) and are served from one copy of the weights.")
    recoveries = {name: [x["recovery"] for x in q["budgets"] if x["recovery"] is not None]
                  for name, q in r.get("quantization", {}).items()}
    quant = [f"{name} keeps {min(rec):.1%}–{max(rec):.1%} of BF16 accuracy across budgets "
             f"({r['quantization'][name]['bytes'] / cb['elastic']:.2f}x the bytes)" for name, rec in recoveries.items() if rec]
    if quant:
        text += " Quantized once, every slice stays usable: " + "; ".join(quant) + "."
    return text
