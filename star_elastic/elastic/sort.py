"""Sorting (paper, pipeline point 2): permute weights so the top-ranked components come first.

Permutations are full-length `IndexSets` (one per layer, plus one shared residual-channel order)
gathered with the same rules that slice a nested submodel, so after sorting "keep a prefix"
means "keep the best". A permutation of hidden channels, heads within their group, experts and
intermediate channels changes no output: the sorted parent's logits equal the original's.
"""

from __future__ import annotations

import torch

from star_elastic.elastic.arch import IndexSets, gather
from star_elastic.elastic.importance import rank_within_groups
from star_elastic.model.hybrid import HybridLM


def _desc(scores: torch.Tensor) -> torch.Tensor:
    return torch.argsort(scores, descending=True, stable=True)


def layer_orders(model: HybridLM, scores: dict[str, torch.Tensor], layer: int | None, hidden: torch.Tensor) -> IndexSets:
    """Full-length permutations for one layer (identity where the layer has no such component)."""
    cfg = model.config

    def get(name, default_len):
        key = f"layers.{layer}.{name}"
        return scores.get(key) if layer is not None and key in scores else None

    attn, mamba = get("attn_heads", 0), get("mamba_heads", 0)
    experts, inter = get("experts", 0), get("expert_inter", 0)
    shared, mlp = get("shared_inter", 0), get("mlp_inter", 0)
    expert_order = _desc(experts) if experts is not None else torch.arange(cfg.n_routed_experts)
    if inter is not None:  # one channel order per expert, rows in the new expert order
        inter_order = torch.argsort(inter, dim=1, descending=True, stable=True)[expert_order]
    else:
        inter_order = torch.arange(cfg.moe_intermediate_size)
    return IndexSets(
        cfg,
        hidden=hidden,
        q_heads=rank_within_groups(attn, cfg.num_key_value_heads) if attn is not None else torch.arange(cfg.num_attention_heads),
        mamba_heads=rank_within_groups(mamba, cfg.n_groups) if mamba is not None else torch.arange(cfg.mamba_num_heads),
        experts=expert_order,
        expert_inter=inter_order,
        shared_inter=_desc(shared) if shared is not None else torch.arange(cfg.moe_shared_expert_intermediate_size),
        mlp_inter=_desc(mlp) if mlp is not None else torch.arange(cfg.intermediate_size),
        layers=torch.arange(cfg.num_layers),
    )


def sort_model(model: HybridLM, scores: dict[str, torch.Tensor]) -> HybridLM:
    """A new HybridLM (same config) with every axis sorted by descending importance."""
    cfg = model.config
    hidden = _desc(scores["hidden"])
    per_layer = [layer_orders(model, scores, i, hidden) for i in range(cfg.num_layers)]
    shared_only = layer_orders(model, scores, None, hidden)
    state = {}
    for key, t in model.state_dict().items():
        sets = per_layer[int(key.split(".")[2])] if key.startswith("backbone.layers.") else shared_only
        state[key] = gather(t, sets.rule(key))
    with torch.device("meta"):
        out = HybridLM(cfg)
    out.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        out.lm_head.weight = out.backbone.embeddings.weight
    out.tokenizer = model.tokenizer
    return out.train(model.training)
