"""Zero-shot slicing: an Architecture and the full (sorted) weights → a standalone smaller model.

Every tensor of the result is a leading slice of the full model's (per group for grouped heads):
`star_elastic.elastic.arch.slice_state` gathers it with the same index sets the elastic forward
uses for its masks.
"""

from __future__ import annotations

import torch

from star_elastic.elastic.arch import Architecture, slice_state
from star_elastic.model.hybrid import HybridLM


def slice_model(model: HybridLM, arch: Architecture) -> HybridLM:
    """A new HybridLM holding copies of the sliced weights (dtype and device kept)."""
    cfg = arch.model_config(model.config)
    state = slice_state(model.state_dict(), model.config, arch)
    with torch.device("meta"):
        small = HybridLM(cfg)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["backbone.embeddings.weight"]
    small.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        small.lm_head.weight = small.backbone.embeddings.weight
    small.tokenizer = model.tokenizer
    return small.eval()


def slice_run(run, budget: float, out) -> dict:
    """`star-elastic slice`: the router's architecture for `budget` → a standalone HF checkpoint."""
    from star_elastic.elastic.run import load_elastic
    from star_elastic.hf import save_model

    elastic = load_elastic(run)
    info = elastic.describe(budget)
    save_model(slice_model(elastic.model, elastic.architecture(budget)), out)
    return info
