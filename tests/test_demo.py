"""Pareto computation on hand-made points, and `demo --quick --baselines` producing a complete, valid report
whose baseline bookkeeping (steps, tokens) matches a recount from the data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from star_elastic.assets import PARENT, sha256
from star_elastic.cli import main
from star_elastic.data.store import TokenStore
from star_elastic.demo import QUICK, render_markdown
from star_elastic.train.elastify import stage_of, stage_samplers
from star_elastic.infer.evaluate import headline, pareto_front


def point(lat, acc, t=1.0, a=1.0, cap=96):
    return {"latency_s": lat, "accuracy": acc, "think_budget": t, "answer_budget": a, "max_think_tokens": cap}


def test_pareto_front_by_hand():
    pts = [point(1.0, 0.9), point(0.5, 0.8), point(0.6, 0.7), point(0.5, 0.8), point(2.0, 0.9), point(0.2, 0.1)]
    # (0.6, 0.7) is dominated by (0.5, 0.8); (2.0, 0.9) by (1.0, 0.9); equal points are both kept
    assert pareto_front(pts) == [True, True, False, True, False, True]


def test_headline_by_hand():
    parent = point(1.0, 0.80)
    pts = [parent, point(0.5, 0.82, 0.5, 1.0), point(0.4, 0.70, 0.5, 0.5), point(0.9, 0.90, 0.75, 1.0)]
    h = headline(pts, parent)
    assert h["at_equal_accuracy"]["config"] == "0.5→1 cap 96"
    assert h["at_equal_accuracy"]["latency_reduction"] == pytest.approx(2.0)
    assert h["at_equal_latency"]["config"] == "0.75→1 cap 96"
    assert h["at_equal_latency"]["accuracy_gain"] == pytest.approx(0.10)


def recount_elastic_tokens(out) -> int:
    """Real tokens of every packed row the quick elastic run trained on, recounted from its token store:
    the stage samplers' document pieces replayed (their lengths; no token read)."""
    e = dataclasses.replace(QUICK.elastify, model=str(out / "parent"), out=str(out / "run"))
    samplers = stage_samplers(e, TokenStore.open(out / "run" / "data"), 0)
    return sum(piece.length for step in range(e.steps) for row in samplers[stage_of(e, step)].take(e.batch_size)
               for piece in row)


def check_baselines(report: dict, out) -> None:
    base = report["baselines"]
    elastic = base["elastic"]
    assert elastic["steps"] == QUICK.elastify.steps and elastic["sizes"] == 3
    assert elastic["tokens"] == recount_elastic_tokens(out)
    assert elastic["tokens_per_size"] == pytest.approx(elastic["tokens"] / 3)
    active = {b["budget"]: b["active_params"] for b in report["budgets"]}
    for kind in ("independent", "independent_elastic_tokens", "compression_equal_tokens", "compression_to_match"):
        assert [row["budget"] for row in base[kind]] == [0.75, 0.5]
        for row in base[kind]:
            assert row["active_params"] == active[row["budget"]] and 0 <= row["accuracy"] <= 1
    recipe = QUICK.parent
    for row, cut in zip(base["independent"], base["independent_elastic_tokens"]):
        # the parent's recipe: its steps; every step draws batch_size whole examples (35..103 tokens)
        assert row["steps"] == recipe.steps
        assert 35 * recipe.batch_size <= row["tokens"] / row["steps"] <= 103 * recipe.batch_size
        # cut to the elastic run's tokens per size, at the recipe's tokens per step
        assert cut["steps"] == max(1, round(elastic["tokens_per_size"] / (row["tokens"] / row["steps"])))
    for row in base["compression_equal_tokens"]:  # a third of the elastic run's steps
        assert row["steps"] == round(QUICK.elastify.steps / 3)
        assert row["tokens"] == pytest.approx(elastic["tokens_per_size"], rel=0.35)
    every = QUICK.baseline.eval_every
    for row in base["compression_to_match"]:
        assert row["matched"] == (row["accuracy"] >= row["target"])
        assert row["steps"] % every == 0 or row["steps"] == QUICK.elastify.steps
        assert [s for s, _ in row["checks"]] == list(range(every, row["steps"] + 1, every))
        assert row["tokens_ratio_lower_bound"] == pytest.approx(row["tokens"] / elastic["tokens_per_size"])


def check_conclusions(report: dict, md: str) -> None:
    """A quick report says it is a smoke test at its top and draws no conclusions; the same numbers
    from a parent at or above min_parent_accuracy in a full run get the headline and the story, and
    from a parent below it none, saying why."""
    assert md.splitlines()[2].startswith("**A smoke test of the pipeline, not a result.**")
    assert report["conclusions"] is False and report["headline"] is None
    assert "No conclusions are drawn from these numbers: a quick run is a smoke test." in md
    assert "matches or beats" not in md and "What it shows" not in md and "parent's default" not in md
    points = report["budget_control"]
    parent = next(p for p in points if p["think_budget"] == p["answer_budget"] == 1.0
                  and p["max_think_tokens"] == max(report["eval"]["think_caps"]))
    full = dict(report, quick=False, conclusions=True, headline=headline(points, parent),
                parent=dict(report["parent"], accuracy=0.95))
    md_full = render_markdown(full)
    assert "What it shows" in md_full and "smoke test" not in md_full and "No conclusions" not in md_full
    low = dict(full, conclusions=False, headline=None, parent=dict(report["parent"], accuracy=0.5))
    assert ("No conclusions are drawn from these numbers: the parent scores 50.0% on the held-out problems, below the 90% "
            "(DemoConfig.min_parent_accuracy) a comparison with it needs.") in render_markdown(low)


def test_demo_quick_writes_a_complete_report(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    limits, savefig = {}, Figure.savefig

    def recording(fig, path, *args, **kwargs):  # the accuracy axis of every plot the demo saves
        limits[Path(path).name] = [ax.get_ylim() for ax in fig.axes if "accuracy" in ax.get_ylabel()]
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    assert main(["demo", "--out", str(tmp_path), "--quick", "--baselines"]) == 0
    assert set(limits) == {"pareto.png", "budgets.png", "baselines.png"}
    assert all(0 <= lo < hi <= 1 for axes in limits.values() for lo, hi in axes) and all(limits.values()), limits
    report = json.loads((tmp_path / "report.json").read_text())
    shipped = json.loads((PARENT / "train_report.json").read_text())
    assert report["parent"]["sha256"] == sha256(PARENT / "model.safetensors") == sha256(tmp_path / "parent" / "model.safetensors")
    assert report["parent"]["own_test"] == {"accuracy": shipped["test"]["accuracy"], "n": shipped["test"]["n"]}
    assert report["parent"]["accuracy"] == next(b["accuracy_before_training"] for b in report["budgets"] if b["budget"] == 1.0)
    budgets = report["budgets"]
    assert [b["budget"] for b in budgets] == [1.0, 0.75, 0.5]
    for b in budgets:
        assert {"budget", "total_params", "active_params", "accuracy", "accuracy_before_training", "latency_s",
                "tokens_per_s"} <= set(b)
        assert 0 <= b["accuracy"] <= 1 and b["latency_s"] > 0
    assert budgets[0]["active_params"] > budgets[1]["active_params"] > budgets[2]["active_params"]
    md = (tmp_path / "report.md").read_text()
    for b in budgets:  # target vs achieved, side by side, from the run's own accounting
        assert b["achieved"] == pytest.approx(b["active_params"] / budgets[0]["active_params"], rel=1e-9)
        assert f"| {b['target']:.3f} → {b['achieved']:.3f}" in md
    assert ("achieved active_params: " + ", ".join(f"{b['budget']:g} → {b['achieved']:.3f}" for b in budgets)) in md
    for b in budgets[1:]:  # the baselines train the elastic architecture: its achieved cost, next to the target
        assert f"| {b['budget']:g} → {b['achieved']:.3f} | {b['active_params']:,} | elastic (one run" in md
    control = report["budget_control"]
    assert len(control) == 3 * 3 * 2  # every (think, answer) pair of budgets at each of 2 caps
    assert any(c["on_front"] for c in control)
    flags = pareto_front(control)
    assert [c["on_front"] for c in control] == flags
    cb = report["checkpoint_bytes"]
    assert cb["separate"] > cb["elastic"] > 0
    q = report["quantization"]
    assert q["nvfp4-ptq"]["bytes"] < q["fp8-ptq"]["bytes"] < cb["elastic"]
    check_baselines(report, tmp_path)
    check_conclusions(report, md)
    for name in ("pareto.png", "budgets.png", "baselines.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 1000
    assert report["reused_stages_s"] == {}
    # a second run reuses every artifact; its wall time line gives the reused stages' earlier times
    assert main(["demo", "--out", str(tmp_path), "--quick", "--baselines"]) == 0
    assert "reusing" in capsys.readouterr().err
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["reused_stages_s"] == {"elastify": report["elastify_seconds"]}
    assert f"elastify reused (took {report['elastify_seconds']} s then)" in (tmp_path / "report.md").read_text()
    assert {k: again[k] for k in ("parent", "budgets", "baselines")} == {k: report[k] for k in ("parent", "budgets", "baselines")}
