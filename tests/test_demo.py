"""Pareto computation on hand-made points, and `demo --quick` producing a complete, valid report."""

from __future__ import annotations

import json

import pytest

from star_elastic.cli import main
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


def test_demo_quick_writes_a_complete_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"accuracy", "params"} <= set(report["parent"])
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
    control = report["budget_control"]
    assert len(control) == 3 * 2 + 6  # every budget at 2 caps + every ordered pair of distinct budgets
    assert any(c["on_front"] for c in control)
    flags = pareto_front(control)
    assert [c["on_front"] for c in control] == flags
    cb = report["checkpoint_bytes"]
    assert cb["separate"] > cb["elastic"] > 0
    q = report["quantization"]
    assert q["nvfp4-ptq"]["bytes"] < q["fp8-ptq"]["bytes"] < cb["elastic"]
    for name in ("pareto.png", "budgets.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 1000
    # a second run reuses every artifact
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    assert "reusing" in capsys.readouterr().err
