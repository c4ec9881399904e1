"""The elastic core: masked forward == sliced model, costs == counted parameters, router fit."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import ELASTIC_TINY, randomize, tiny_config

from star_elastic import HybridLM
from star_elastic.accounting import count_params, memory_bytes
from star_elastic.config import ConfigError, ElasticConfig
from star_elastic.elastic.arch import Architecture, IndexSets, slice_model
from star_elastic.elastic.router import (
    BudgetRouter, CostModel, encode_budget, fit_router_to_cost, one_hot_picks,
)
from star_elastic.elastic.projection import closest_achievable
from star_elastic.elastic.space import ChoiceSpace



def random_arch(cfg, rng: random.Random, depth: bool) -> Architecture:
    full = Architecture.full(cfg)
    layers = tuple(sorted(rng.sample(range(cfg.num_layers), rng.randint(1, cfg.num_layers)))) if depth else full.layers
    return Architecture(
        hidden=rng.randint(1, full.hidden), attn_heads=rng.randint(1, full.attn_heads),
        mamba_heads=rng.randint(1, full.mamba_heads), experts=rng.randint(cfg.num_experts_per_tok, full.experts),
        expert_inter=rng.randint(1, full.expert_inter), shared_inter=rng.randint(1, full.shared_inter),
        mlp_inter=rng.randint(1, full.mlp_inter), layers=layers,
    )


@pytest.mark.parametrize("seed", range(6))
def test_masked_forward_equals_sliced_model(seed):
    cfg = tiny_config(n_groups=2 + 2 * (seed % 2), tie_word_embeddings=seed == 3)
    model = randomize(HybridLM(cfg), seed=seed, scale=0.2).eval()
    rng = random.Random(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    for trial in range(5):
        arch = random_arch(cfg, rng, depth=trial % 2 == 1)
        with torch.no_grad():
            masked = model(ids, masks=IndexSets.prefix(cfg, arch).masks())
            sliced = slice_model(model, arch)(ids)
        torch.testing.assert_close(masked, sliced, atol=1e-5, rtol=0)


def test_each_axis_alone_masked_equals_sliced():
    cfg = tiny_config()
    model = randomize(HybridLM(cfg), seed=1, scale=0.2).eval()
    full = Architecture.full(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    for change in (dict(hidden=17), dict(attn_heads=1), dict(mamba_heads=2), dict(experts=3), dict(expert_inter=5),
                   dict(shared_inter=7), dict(mlp_inter=11), dict(layers=(0, 2, 3, 7))):
        arch = dataclasses.replace(full, **change)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, masks=IndexSets.prefix(cfg, arch).masks()),
                                       slice_model(model, arch)(ids), atol=1e-5, rtol=0)


def test_sliced_tensors_are_leading_slices_per_group():
    cfg = tiny_config()
    model = randomize(HybridLM(cfg), seed=2).eval()
    arch = dataclasses.replace(Architecture.full(cfg), hidden=32, attn_heads=2, mamba_heads=3)
    small = slice_model(model, arch)
    q_full = model.backbone.layers[1].mixer.q_proj.weight.view(2, 3, 8, 48)  # (kv groups, heads/group, hd, C)
    q_small = small.backbone.layers[1].mixer.q_proj.weight.view(2, 2, 8, 32)
    assert torch.equal(q_small, q_full[:, :2, :, :32])
    A_full = model.backbone.layers[0].mixer.A_log.view(2, 4)
    assert torch.equal(small.backbone.layers[0].mixer.A_log.view(2, 3), A_full[:, :3])


@pytest.mark.parametrize("budget_type", ["total_params", "active_params", "memory"])
def test_cost_equals_counted_parameters_and_memory(budget_type):
    cfg = tiny_config(**ELASTIC_TINY)
    ecfg = ElasticConfig(budget_type=budget_type, axes=ElasticConfig().axes + ("depth",), memory_context=77)
    space = ChoiceSpace.build(cfg, ecfg, layer_order=[3, 1, 0, 7, 2, 6, 5, 4])
    cost = CostModel(space, ecfg)
    rng = random.Random(0)
    for _ in range(12):
        picks = {a: rng.randrange(len(c)) for a, c in space.choices.items()}
        small_cfg = space.architecture(picks).model_config(cfg)
        with torch.device("meta"):
            numel = sum(p.numel() for p in HybridLM(small_cfg).parameters())
        counted = count_params(small_cfg)
        expected = {
            "total_params": numel,
            "active_params": counted.active_params,
            "memory": memory_bytes(small_cfg, ecfg.memory_batch, ecfg.memory_context)["total"],
        }[budget_type]
        assert counted.total_params == numel
        assert float(cost.cost(one_hot_picks(space, picks))) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("budget_type", ["total_params", "active_params", "memory"])
def test_router_fitted_to_cost_is_within_2_percent(budget_type):
    cfg = tiny_config(**ELASTIC_TINY)
    ecfg = ElasticConfig(budget_type=budget_type)
    space = ChoiceSpace.build(cfg, ecfg)
    cost = CostModel(space, ecfg)
    router = BudgetRouter(space, len(ecfg.budgets))
    fit_router_to_cost(router, cost, ecfg.budgets, steps=150)
    for b in ecfg.budgets:
        achieved = float(cost.relative(one_hot_picks(space, router.pick(encode_budget(b, ecfg.budgets)))))
        best = closest_achievable(cost, b)
        assert abs(achieved - b) <= max(0.02 * b, abs(best - b)) + 1e-9, (b, achieved, best)
    assert router.pick(encode_budget(1.0, ecfg.budgets)) == {a: 0 for a in space.axes}


def test_budget_encoding_interpolates_and_rejects_outside():
    budgets = (1.0, 0.75, 0.5)
    assert encode_budget(0.75, budgets).tolist() == [0, 1, 0]
    assert encode_budget(0.6, budgets).tolist() == pytest.approx([0, 0.4, 0.6])
    with pytest.raises(ConfigError, match=r"budget 0.3 is outside the trained range \[0.5, 1.0\]"):
        encode_budget(0.3, budgets)


def test_bad_elastic_configs_name_the_problem():
    cfg = tiny_config(**ELASTIC_TINY)
    with pytest.raises(ConfigError, match="descending"):
        ElasticConfig(budgets=(0.5, 1.0))
    with pytest.raises(ConfigError, match=r"budget_type must be one of \[.*\], got 'flops'"):
        ElasticConfig(budget_type="flops")
    with pytest.raises(ConfigError, match="unknown elastic axis 'width'"):
        ElasticConfig(axes=("width",))
    with pytest.raises(ConfigError, match="choice 40 for 'hidden' keeps runs of 40 input channels, not a multiple of elastic.multiple=16"):
        ChoiceSpace.build(cfg, ElasticConfig(choices={"hidden": [64, 40]}))
    with pytest.raises(ConfigError, match="must include the full size 64"):
        ChoiceSpace.build(cfg, ElasticConfig(choices={"hidden": [48, 32]}))
    with pytest.raises(ConfigError, match="choice 1 for 'experts' is outside 2..8"):
        ChoiceSpace.build(cfg, ElasticConfig(choices={"experts": [8, 1]}))


def test_latency_budget_uses_the_profiled_table():
    from star_elastic.elastic.router import profile_latency

    cfg = tiny_config(**ELASTIC_TINY)
    model = randomize(HybridLM(cfg), seed=3, scale=0.2).eval()
    ecfg = ElasticConfig(budget_type="latency")
    space = ChoiceSpace.build(cfg, ecfg)
    table = profile_latency(model, space, batch=1, seq_len=16, repeats=3)
    assert set(table["axes"]) == set(space.axes) and all(len(table["axes"][a]) == len(space.choices[a]) for a in space.axes)
    cost = CostModel(space, ecfg, table)
    assert float(cost.cost(one_hot_picks(space, {a: 0 for a in space.axes}))) == pytest.approx(table["full"])
    picks = {a: 0 for a in space.axes} | {"hidden": 2}
    assert float(cost.cost(one_hot_picks(space, picks))) == pytest.approx(table["axes"]["hidden"][2])
    with pytest.raises(ConfigError, match="needs a latency table"):
        CostModel(space, ecfg)
