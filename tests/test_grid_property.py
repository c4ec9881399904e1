"""The default choice grid is feasible for every valid Nemotron-H config (odd sizes, few heads, n_groups
from 1 to the heads, experts equal to top-k, sizes below `multiple`): each axis's choices start at its full
size and never exceed it, and the router and one elastic training step work on it — the step's masked
forward equals the sliced model of the architecture it sampled, and its backward reaches every router
axis that has a choice to make."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import randomize

from star_elastic import HybridLM, ModelConfig
from star_elastic.config import ElasticConfig
from star_elastic.elastic.router import router_loss, settle_router
from star_elastic.elastic.run import build_elastic
from star_elastic.elastic.arch import slice_model
from star_elastic.train.distill import DistillStep

N_CONFIGS = 50
BLOCKS = {"attn_heads": "*", "mamba_heads": "M", "experts": "E", "expert_inter": "E", "shared_inter": "E",
          "mlp_inter": "-"}
"""The block kind an axis sizes (hidden and depth size every layer)."""


def random_config(rng: random.Random) -> ModelConfig:
    kv, groups = rng.randint(1, 3), rng.randint(1, 4)
    top_k = rng.randint(1, 3)
    return ModelConfig(
        vocab_size=rng.randint(16, 48), hidden_size=rng.randint(3, 70),
        pattern="".join(rng.choice("M*E-") for _ in range(rng.randint(1, 5))),
        num_attention_heads=kv * rng.randint(1, 4), num_key_value_heads=kv, head_dim=rng.randint(1, 20),
        intermediate_size=rng.randint(1, 70), mamba_num_heads=groups * rng.randint(1, 4), n_groups=groups,
        mamba_head_dim=rng.randint(1, 20), ssm_state_size=rng.randint(1, 8), conv_kernel=rng.randint(1, 4),
        chunk_size=rng.randint(1, 8), n_routed_experts=top_k + rng.choice([0, 0, 1, 3, 6]), num_experts_per_tok=top_k,
        moe_intermediate_size=rng.randint(1, 40), moe_shared_expert_intermediate_size=rng.randint(1, 40),
    )


def full_sizes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Axis → (smallest allowed, full size), written out from the config."""
    return {"hidden": (1, cfg.hidden_size), "attn_heads": (1, cfg.num_attention_heads // cfg.num_key_value_heads),
            "mamba_heads": (1, cfg.mamba_num_heads // cfg.n_groups),
            "experts": (cfg.num_experts_per_tok, cfg.n_routed_experts), "expert_inter": (1, cfg.moe_intermediate_size),
            "shared_inter": (1, cfg.moe_shared_expert_intermediate_size), "mlp_inter": (1, cfg.intermediate_size),
            "depth": (1, len(cfg.pattern))}


@pytest.mark.parametrize("chunk", range(5))  # 5 x 10 configs
def test_default_grid_router_and_one_step_for_random_valid_configs(chunk):
    for i in range(chunk * N_CONFIGS // 5, (chunk + 1) * N_CONFIGS // 5):
        rng = random.Random(i)
        cfg = random_config(rng)
        axes = ElasticConfig().axes + (("depth",) if rng.random() < 0.3 else ())
        ecfg = ElasticConfig(budget_type=rng.choice(["total_params", "active_params", "memory"]), axes=axes,
                             fractions=rng.choice([(1.0, 0.75, 0.5), (1.0, 0.9, 0.33), (1.0, 0.6, 0.55, 0.1)]))
        model = randomize(HybridLM(cfg), seed=i, scale=0.3).eval()
        elastic = build_elastic(model, ecfg, None, None)
        for axis, values in elastic.space.choices.items():
            low, full = full_sizes(cfg)[axis]
            assert values[0] == full and all(low <= v <= full for v in values), (i, cfg, axis, values)
            assert list(values) == sorted(set(values), reverse=True), (i, axis, values)
        if i % 5 == 0:  # the projection (teaching the router its picks: ~3 s each) on every fifth grid
            settle_router(elastic.router, elastic.cost, ecfg.budgets)
        budget = rng.choice(ecfg.budgets[1:])
        ids = torch.randint(0, cfg.vocab_size, (2, rng.randint(2, 9)), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            teacher_hidden = model(ids, head=False)
        elastic.zero_grad(set_to_none=True)
        step = DistillStep(elastic, chunk_tokens=5)
        kl, _, picks = step(ids, budget, 1.0, torch.Generator().manual_seed(i), teacher_hidden, model.lm_head,
                            torch.ones(ids.shape))
        (kl + router_loss(elastic.cost, picks, budget)).backward()

        arch = elastic.space.architecture({a: int(p.argmax()) for a, p in picks.items()})
        with torch.no_grad():
            masked, _ = elastic.forward_sampled(ids, budget, 1.0, torch.Generator().manual_seed(i))
            torch.testing.assert_close(masked, slice_model(model, arch)(ids), atol=1e-4, rtol=1e-4)
        for name, p in elastic.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (i, name)
        kept = "".join(cfg.pattern[layer] for layer in arch.layers)  # the sampled depth may drop layers
        for axis, net in elastic.router.nets.items():  # every axis with a choice that changes the model
            grad = net[-1].weight.grad
            if len(elastic.space.choices[axis]) > 1 and BLOCKS.get(axis, "") in kept:
                assert grad is not None and grad.abs().sum() > 0, (i, axis)


def test_the_reported_parent_hidden_48_expert_inter_24():
    """The issue's case: 24 channels per expert, multiple 16: the full 24 and the 16 below it (was [32, 16])."""
    from conftest import ELASTIC_TINY, tiny_config

    from star_elastic.elastic.space import ChoiceSpace

    space = ChoiceSpace.build(tiny_config(**(ELASTIC_TINY | dict(hidden_size=48, moe_intermediate_size=24))),
                              ElasticConfig())
    assert space.choices["expert_inter"] == (24, 16) and space.choices["hidden"] == (48, 32)
