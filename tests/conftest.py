"""Shared fixtures: tiny random Nemotron-H configs, for both transformers and star_elastic."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning)

TINY = dict(
    vocab_size=97, hidden_size=48, pattern="M*EM-E*M", num_attention_heads=6, num_key_value_heads=2,
    head_dim=8, intermediate_size=40, mamba_num_heads=8, mamba_head_dim=6, ssm_state_size=5, n_groups=2,
    n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=12,
    moe_shared_expert_intermediate_size=20, chunk_size=4, routed_scaling_factor=2.5,
)


def tiny_config(**changes):
    from star_elastic import ModelConfig

    return ModelConfig(**(TINY | changes))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Give every tensor (norms, biases, correction bias too) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(noise * scale if p.dim() > 1 else 1 + 0.2 * noise)
    for name, b in model.named_buffers():
        if "correction" in name:
            b.copy_(torch.rand(b.shape, generator=g) * 0.5)
    return model


def hf_model(cfg):
    """transformers' NemotronHForCausalLM for a star_elastic ModelConfig, random weights."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**cfg.to_hf_dict())).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ELASTIC_TINY = dict(hidden_size=64, head_dim=16, num_attention_heads=8, num_key_value_heads=2, mamba_num_heads=8,
                    mamba_head_dim=16, n_groups=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
                    intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2)


def tiny_elastic(seed: int = 0, budget_type: str = "active_params", fit_steps: int = 60, **changes):
    """An ElasticLM over a random tiny model, router fitted to the cost (no sorting, no training)."""
    from star_elastic import HybridLM
    from star_elastic.config import ElasticConfig
    from star_elastic.elastic.router import fit_router_to_cost
    from star_elastic.elastic.run import build_elastic

    model = randomize(HybridLM(tiny_config(**(ELASTIC_TINY | changes))), seed=seed, scale=0.2).eval()
    elastic = build_elastic(model, ElasticConfig(budget_type=budget_type), None, None)
    fit_router_to_cost(elastic.router, elastic.cost, elastic.ecfg.budgets, steps=fit_steps, seed=seed)
    return elastic.eval()


def digest(path) -> str:
    """SHA-256 over a folder's relative paths and file bytes: "left untouched" made checkable."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
