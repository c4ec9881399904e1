"""Budgets that hold: after settling, every trained budget's architecture costs within ±2% of its target
(band) or at most the target (ceiling), checked against parameter counts of the physically sliced
config over the whole choice grid; nested budgets are contained on every axis; the choice is the
router's best-scored architecture in the window (brute force over the grid)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ELASTIC_TINY, randomize, tiny_config

from star_elastic import HybridLM, save_model
from star_elastic.accounting import count_params, memory_bytes
from star_elastic.config import ConfigError, ElasticConfig
from star_elastic.elastic.model import cost_line
from star_elastic.elastic.router import encode_budget, router_loss, settle_router
from star_elastic.elastic.run import build_elastic

CASES = [  # (model changes, budget type, budgets, mode)
    (dict(), "active_params", (1.0, 0.75, 0.5), "band"),
    (dict(n_groups=4, tie_word_embeddings=True), "total_params", (1.0, 0.8, 0.6, 0.45), "band"),
    (dict(pattern="M*EE-M", n_routed_experts=6), "memory", (1.0, 0.7, 0.5), "band"),
    (dict(), "active_params", (1.0, 0.75, 0.5), "ceiling"),
    (dict(n_groups=4), "total_params", (1.0, 0.66, 0.4), "ceiling"),
    (dict(pattern="M*EE-M", n_routed_experts=6), "memory", (1.0, 0.9, 0.55), "ceiling"),
]


def perturbed_elastic(seed: int, changes: dict, **ecfg):
    """A random tiny model whose router is random too (far from any budget): the worst case to settle."""
    model = randomize(HybridLM(tiny_config(**(ELASTIC_TINY | changes))), seed=seed, scale=0.2).eval()
    elastic = build_elastic(model, ElasticConfig(**ecfg), None, None)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in elastic.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    return elastic


def reference_costs(elastic) -> dict[tuple[int, ...], float]:
    """Every grid architecture → its cost relative to the full model, from the sliced config's counts."""
    ecfg, space, cfg = elastic.ecfg, elastic.space, elastic.config

    def cost(c) -> float:
        if ecfg.budget_type == "memory":
            return memory_bytes(c, ecfg.memory_batch, ecfg.memory_context)["total"]
        counts = count_params(c)
        return counts.total_params if ecfg.budget_type == "total_params" else counts.active_params

    full = cost(cfg)
    grid = itertools.product(*(range(len(space.choices[a])) for a in space.axes))
    return {idx: cost(space.architecture(dict(zip(space.axes, idx))).model_config(cfg)) / full for idx in grid}


def in_window(rel: float, budget: float, mode: str, tol: float = 0.02) -> bool:
    if mode == "ceiling":
        return budget * (1 - 2 * tol) - 1e-12 <= rel <= budget + 1e-12
    return abs(rel / budget - 1) <= tol + 1e-12


def router_scores(elastic, budget: float) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {a: F.log_softmax(l, -1) for a, l in elastic.router(encode_budget(budget, elastic.ecfg.budgets)).items()}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_settled_budgets_hold_and_take_the_best_scored_architecture(case):
    changes, budget_type, budgets, mode = CASES[case]
    elastic = perturbed_elastic(case, changes, budget_type=budget_type, budgets=budgets, budget_mode=mode,
                                memory_context=300)
    ref = reference_costs(elastic)
    scores = {b: router_scores(elastic, b) for b in budgets}
    before = {b: elastic.describe(b)["achieved"] for b in budgets}
    assert any(not in_window(before[b], b, mode) for b in budgets)  # the random router misses
    settle_router(elastic.router, elastic.cost, budgets)
    axes = elastic.space.axes
    for b in budgets[1:]:
        info = elastic.describe(b)
        picks = tuple(elastic.picks(b)[a] for a in axes)
        assert info["achieved"] == pytest.approx(ref[picks], rel=1e-9)
        assert info["held"] and in_window(ref[picks], b, mode), (b, ref[picks])
        # no in-window architecture has a higher router score (brute force over the grid)
        score = {idx: sum(float(scores[b][a][i]) for a, i in zip(axes, idx)) for idx in ref}
        best = max(score[idx] for idx, rel in ref.items() if in_window(rel, b, mode))
        assert score[picks] == pytest.approx(best, abs=1e-5)
    assert elastic.picks(1.0) == {a: 0 for a in axes}


@pytest.mark.parametrize("mode", ["band", "ceiling"])
def test_nested_budgets_are_contained_on_every_axis(mode):
    budgets = (1.0, 0.8, 0.6, 0.45)
    elastic = perturbed_elastic(7, dict(n_groups=4), budgets=budgets, budget_mode=mode, nested=True)
    ref = reference_costs(elastic)
    scores = {b: router_scores(elastic, b) for b in budgets}
    settle_router(elastic.router, elastic.cost, budgets)
    archs = [elastic.architecture(b) for b in budgets]
    for larger, smaller in zip(archs, archs[1:]):
        for field in ("hidden", "attn_heads", "mamba_heads", "experts", "expert_inter", "shared_inter", "mlp_inter"):
            assert getattr(smaller, field) <= getattr(larger, field), field
        assert set(smaller.layers) <= set(larger.layers)
    counts = [count_params(a.model_config(elastic.config)) for a in archs]
    assert all(x.total_params >= y.total_params and x.active_params >= y.active_params for x, y in zip(counts, counts[1:]))
    axes = elastic.space.axes
    for b in budgets[1:]:
        assert in_window(ref[tuple(elastic.picks(b)[a] for a in axes)], b, mode)
    # the chain maximises the summed router score (brute force over in-window triples of the grid)
    window = {b: [idx for idx, rel in ref.items() if in_window(rel, b, mode)] for b in budgets[1:]}
    score = {b: {idx: sum(float(scores[b][a][i]) for a, i in zip(axes, idx)) for idx in window[b]} for b in budgets[1:]}

    def inside(small, large):
        return all(s >= l for s, l in zip(small, large))

    best = max(score[0.8][x] + score[0.6][y] + score[0.45][z] for x in window[0.8] for y in window[0.6] if inside(y, x)
               for z in window[0.45] if inside(z, y))
    got = sum(score[b][tuple(elastic.picks(b)[a] for a in axes)] for b in budgets[1:])
    assert got == pytest.approx(best, abs=1e-5)


def test_a_grid_that_cannot_hold_a_budget_says_so():
    coarse = dict(axes=("hidden",), choices={"hidden": [64, 32]}, budgets=(1.0, 0.75))
    elastic = perturbed_elastic(1, {}, **coarse)
    settle_router(elastic.router, elastic.cost, (1.0, 0.75))
    ref = reference_costs(elastic)
    info = elastic.describe(0.75)
    assert not info["held"] and info["achieved"] == pytest.approx(min(ref.values(), key=lambda r: abs(r - 0.75)))
    assert cost_line(info) == f"target 0.750 active_params, achieved {info['achieved']:.3f} (band ±2%: NOT held)"
    ceiling = perturbed_elastic(1, {}, **coarse, budget_mode="ceiling")
    settle_router(ceiling.router, ceiling.cost, (1.0, 0.75))
    assert ceiling.describe(0.75)["achieved"] == pytest.approx(max(r for r in ref.values() if r <= 0.75))
    low = perturbed_elastic(1, {}, **coarse | {"budgets": (1.0, 0.3)}, budget_mode="ceiling")
    with pytest.raises(ConfigError, match=r"active_params budget 0.3: no architecture in the choice grid costs ≤ the target"):
        settle_router(low.router, low.cost, (1.0, 0.3))


def test_router_loss_is_zero_inside_the_dead_zone_and_pulls_from_outside():
    elastic = perturbed_elastic(2, {}, budgets=(1.0, 0.5))
    cost = elastic.cost
    for mode, inside, outside in (("band", 0.005, 0.03), ("ceiling", -0.02, 0.0)):
        cost.ecfg.budget_mode = mode
        for dev, zero in ((inside, True), (outside, False)):
            # a soft pick whose cost is exactly budget·(1 + dev): mix the cheapest and the full choice of "hidden"
            full = {a: F.one_hot(torch.tensor(0), len(c)).double() for a, c in elastic.space.choices.items()}
            n = len(elastic.space.choices["hidden"])
            lo = dict(full, hidden=F.one_hot(torch.tensor(n - 1), n).double())
            c_full, c_lo = float(cost.relative(full)), float(cost.relative(lo))
            w = torch.tensor((0.5 * (1 + dev) - c_lo) / (c_full - c_lo), dtype=torch.float64, requires_grad=True)
            mix = dict(full, hidden=w * full["hidden"] + (1 - w) * lo["hidden"])
            capacity = float(cost.capacity(mix).detach())
            loss = router_loss(cost, mix, 0.5)
            assert float(cost.relative(mix).detach()) == pytest.approx(0.5 * (1 + dev))
            assert (float(loss.detach()) + 1e-2 * capacity == pytest.approx(0, abs=1e-12)) == zero, (mode, dev)


def test_budget_mode_none_is_the_plain_square_and_the_closest_fit():
    """budget_mode none (the behaviour before budgets were held): the router loss is the squared relative
    deviation, and the cost fit's picks are the grid's closest architecture, with no window to hold."""
    budgets = (1.0, 0.75, 0.5)
    elastic = perturbed_elastic(3, {}, budgets=budgets, budget_mode="none")
    ref = reference_costs(elastic)
    totals = reference_costs(perturbed_elastic(3, {}, budgets=budgets, budget_type="total_params"))
    space = elastic.space
    for idx in list(ref)[::7]:
        picks = {a: F.one_hot(torch.tensor(i), len(space.choices[a])).double() for a, i in zip(space.axes, idx)}
        for b in budgets[1:]:
            expected = (ref[idx] / b - 1) ** 2 - 1e-2 * totals[idx]
            assert float(router_loss(elastic.cost, picks, b).detach()) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    settle_router(elastic.router, elastic.cost, budgets)
    for b in budgets[1:]:
        info = elastic.describe(b)
        assert abs(info["achieved"] - b) == pytest.approx(min(abs(r - b) for r in ref.values()), abs=1e-12)
        assert info["held"] is None
        assert cost_line(info) == (f"target {b:.3f} active_params, achieved {info['achieved']:.3f} "
                                   f"(budget_mode none: {info['achieved'] / b - 1:+.1%})")


def test_bad_budget_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"budget_mode must be one of \['band', 'ceiling', 'none'\], got 'floor'"):
        ElasticConfig(budget_mode="floor")
    with pytest.raises(ConfigError, match="nested budgets are chosen by projection, which budget_mode 'none' skips"):
        ElasticConfig(budget_mode="none", nested=True)
    with pytest.raises(ConfigError, match=r"budget_tolerance must be in \(0, 0.5\)"):
        ElasticConfig(budget_tolerance=0)
    with pytest.raises(ConfigError, match="nested must be true or false"):
        ElasticConfig(nested="yes")


def test_trained_run_records_and_prints_target_and_achieved(tmp_path, capsys):
    """A short CLI elastify (ceiling, nested): run.json, describe and `slice` agree on target vs achieved."""
    from test_elastify import TINY_PARENT

    from star_elastic import ModelConfig
    from star_elastic.cli import main
    from star_elastic.data.tokenizer import build_tokenizer
    from star_elastic.elastic.run import load_elastic

    tok = build_tokenizer()
    parent = HybridLM(ModelConfig(**TINY_PARENT, vocab_size=len(tok))).init_weights(0)
    parent.tokenizer = tok
    save_model(parent, tmp_path / "parent")
    run = tmp_path / "run"
    assert main(["elastify", "--model", str(tmp_path / "parent"), "--data", "synthetic", "--budgets", "1.0,0.75,0.5",
                 "--steps", "4", "--stage1-seq-len", "16", "--stage2-seq-len", "32", "--batch-size", "2",
                 "--out", str(run), "--budget-mode", "ceiling", "--nested"]) == 0
    capsys.readouterr()
    elastic = load_elastic(run)
    recorded = json.loads((run / "run.json").read_text())["costs"]
    for b in (0.75, 0.5):
        info = elastic.describe(b)
        ref = count_params(elastic.architecture(b).model_config(elastic.config)).active_params
        achieved = ref / count_params(elastic.config).active_params
        assert info["achieved"] == pytest.approx(achieved, rel=1e-9) and achieved <= b  # a ceiling is never exceeded
        assert info["held"] == in_window(achieved, b, "ceiling")
        assert recorded[str(b)] == {"target": b, "achieved": info["achieved"], "budget_type": "active_params",
                                    "budget_mode": "ceiling", "held": info["held"]}
        assert main(["slice", str(run), "--budget", str(b), "--out", str(tmp_path / f"s{b}")]) == 0
        held = "held" if info["held"] else "NOT held"
        assert f"target {b:.3f} active_params, achieved {achieved:.3f} (ceiling: {held})" in capsys.readouterr().out
    small, large = elastic.architecture(0.5), elastic.architecture(0.75)
    assert all(getattr(small, f) <= getattr(large, f) for f in ("hidden", "attn_heads", "mamba_heads", "experts",
                                                                  "expert_inter", "shared_inter", "mlp_inter"))
