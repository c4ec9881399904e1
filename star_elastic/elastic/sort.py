"""Sorting (paper, "The pipeline", point 2): permute weights so the most important come first.

`sort_model` builds full-length permutations as `IndexSets` and gathers every state-dict tensor
with `IndexSets.rule` — the same rules that later cut a nested submodel out (`slice_state`), so
after sorting "keep a prefix" means "keep the top-ranked". Orders:
  - hidden (residual) channels: ONE order for the whole model (embeddings, every layer, norm_f,
    lm_head), because all layers share the residual stream;
  - heads, experts, intermediate channels: each layer by its own scores (a per-layer permutation
    is function-preserving on its own, and the kept prefix is then each layer's best);
  - attention heads stay inside their KV group and Mamba heads inside their SSM group (B/C and
    the gated norm are per group), so a per-group prefix keeps the same count in every group;
  - each routed expert's intermediate channels by that expert's own scores;
  - depth is not permuted: the layer order is the model. Layer scores only pick which layers a
    depth-elastic submodel drops.
Every permutation leaves the function unchanged: the sorted model's logits equal the original's.
A missing score key leaves that component in its current order.
"""

from __future__ import annotations

import torch

from star_elastic.config import ConfigError, ModelConfig
from star_elastic.elastic.arch import IndexSets, gather
from star_elastic.elastic.importance import rank_within_groups
from star_elastic.model.hybrid import HybridLM


def descending(scores: torch.Tensor) -> torch.Tensor:
    """Permutation putting the highest score first; ties keep the lower index first."""
    return torch.argsort(scores, descending=True, stable=True)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every score key `compute_scores` produces for `cfg`, with its shape."""
    per_kind = {
        "*": {"attn_heads": (cfg.num_attention_heads,)},
        "M": {"mamba_heads": (cfg.mamba_num_heads,)},
        "-": {"mlp_inter": (cfg.intermediate_size,)},
        "E": {"experts": (cfg.n_routed_experts,), "expert_inter": (cfg.n_routed_experts, cfg.moe_intermediate_size),
              "shared_inter": (cfg.moe_shared_expert_intermediate_size,)},
    }
    shapes = {"hidden": (cfg.hidden_size,), "depth": (cfg.num_layers,)}
    for i, kind in enumerate(cfg.pattern):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_kind[kind].items()})
    return shapes


def check_scores(cfg: ModelConfig, scores: dict[str, torch.Tensor]) -> None:
    """Raise ConfigError if a score key is unknown for `cfg` or has the wrong shape
    (typically: scores computed for another model)."""
    shapes = expected_shapes(cfg)
    for key, value in scores.items():
        if key not in shapes:
            raise ConfigError(f"importance score {key!r} does not exist for pattern {cfg.pattern!r}")
        if tuple(value.shape) != shapes[key]:
            raise ConfigError(
                f"importance score {key!r} has shape {tuple(value.shape)}, this model needs {shapes[key]}"
                " (scores of another model?)"
            )


def identity_sets(cfg: ModelConfig, hidden: torch.Tensor) -> IndexSets:
    """Full-length sets: `hidden` as given, every other axis in its current order."""
    return IndexSets(
        cfg,
        hidden=hidden,
        q_heads=torch.arange(cfg.num_attention_heads),
        mamba_heads=torch.arange(cfg.mamba_num_heads),
        experts=torch.arange(cfg.n_routed_experts),
        expert_inter=torch.arange(cfg.moe_intermediate_size),
        shared_inter=torch.arange(cfg.moe_shared_expert_intermediate_size),
        mlp_inter=torch.arange(cfg.intermediate_size),
        layers=torch.arange(cfg.num_layers),
    )


def layer_sets(cfg: ModelConfig, scores: dict[str, torch.Tensor], layer: int, hidden: torch.Tensor) -> IndexSets:
    """Full-length permutations of layer `layer`, from its own scores (identity where absent)."""
    sets = identity_sets(cfg, hidden)

    def get(name):
        return scores.get(f"layers.{layer}.{name}")

    if (s := get("attn_heads")) is not None:  # within each KV group
        sets.q_heads = rank_within_groups(s, cfg.num_key_value_heads)
    if (s := get("mamba_heads")) is not None:  # within each SSM group
        sets.mamba_heads = rank_within_groups(s, cfg.n_groups)
    if (s := get("mlp_inter")) is not None:
        sets.mlp_inter = descending(s)
    if (s := get("shared_inter")) is not None:
        sets.shared_inter = descending(s)
    if (s := get("experts")) is not None:
        sets.experts = descending(s)
    if (s := get("expert_inter")) is not None:
        # (E, I): one channel order per expert. gather applies dim 0 (experts) first, so row r must
        # be the order of the expert that lands at position r: index the rows by the expert order.
        sets.expert_inter = torch.argsort(s, dim=1, descending=True, stable=True)[sets.experts]
    return sets


def sort_rules(cfg: ModelConfig, scores: dict[str, torch.Tensor]):
    """key → the `gather` rule (dim → full-length permutation) that puts the most important
    components of that state-dict tensor first. One tensor at a time: `sort_model` applies it to a
    whole model, the meta-device loader (star_elastic.distributed.loading) to each tensor as it streams."""
    check_scores(cfg, scores)
    hidden = descending(scores["hidden"]) if "hidden" in scores else torch.arange(cfg.hidden_size)
    outer = identity_sets(cfg, hidden)  # embeddings, norm_f, lm_head: hidden rules only
    per_layer = [layer_sets(cfg, scores, i, hidden) for i in range(cfg.num_layers)]

    def rule(key: str) -> dict[int, torch.Tensor]:
        sets = per_layer[int(key.split(".")[2])] if key.startswith("backbone.layers.") else outer
        return sets.rule(key)

    return rule


def sort_model(model: HybridLM, scores: dict[str, torch.Tensor]) -> HybridLM:
    """A NEW HybridLM (same config, tokenizer, train/eval mode) whose weights are permuted so the
    most important components come first on every axis; `model` itself is left untouched (the
    copy briefly doubles weight memory). A tied LM head stays tied."""
    rule = sort_rules(model.config, scores)
    state = {key: gather(t, rule(key)) for key, t in model.state_dict().items()}
    return HybridLM.from_state_dict(model.config, state, model.tokenizer).train(model.training)
