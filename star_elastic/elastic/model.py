"""ElasticLM: one HybridLM plus a budget router; `elastic(ids, budget=b)` runs the submodel for b.

Training: the router samples a hard (straight-through) pick per axis, the pick times the axis's
mask table gives the masks, and the shared weights run masked. Inference and slicing: the router's
argmax pick → `Architecture` → `IndexSets.prefix` → masks or sliced weights. Every path goes
through `ChoiceSpace.mask_table` / `IndexSets.prefix`, so masked and sliced cannot disagree.
"""

from __future__ import annotations

import torch
from torch import nn

from star_elastic import accounting
from star_elastic.config import ElasticConfig
from star_elastic.elastic.arch import Architecture, IndexSets
from star_elastic.elastic.projection import window
from star_elastic.elastic.router import BudgetRouter, CostModel, encode_budget, one_hot_picks
from star_elastic.elastic.space import ChoiceSpace
from star_elastic.model.hybrid import HybridLM, Masks

# Masks field fed by each axis's mask table.
MASK_FIELD = {
    "hidden": "hidden", "attn_heads": "attn_heads", "mamba_heads": "mamba_heads", "experts": "experts",
    "expert_inter": "expert_inter", "shared_inter": "shared_inter", "mlp_inter": "mlp_inter", "depth": "layers",
}


class ElasticLM(nn.Module):
    def __init__(self, model: HybridLM, ecfg: ElasticConfig, space: ChoiceSpace, cost: CostModel):
        super().__init__()
        self.model, self.ecfg, self.space, self.cost = model, ecfg, space, cost
        self.router = BudgetRouter(space, len(ecfg.budgets), ecfg.router_hidden)
        for axis in space.axes:
            self.register_buffer(f"table_{axis}", space.mask_table(axis), persistent=False)

    @property
    def config(self):
        return self.model.config

    def budget_vector(self, budget: float) -> torch.Tensor:
        return encode_budget(budget, self.ecfg.budgets)

    def picks(self, budget: float) -> dict[str, int]:
        """Choice index per axis for `budget`; budget 1.0 is the full (parent) architecture."""
        vec = self.budget_vector(budget)  # validates the range
        if budget >= 1.0:
            return {axis: 0 for axis in self.space.axes}
        return self.router.pick(vec.to(next(self.router.parameters()).device))

    def architecture(self, budget: float) -> Architecture:
        return self.space.architecture(self.picks(budget))

    def describe(self, budget: float) -> dict:
        """Per-axis sizes, parameter counts and target vs achieved cost of the submodel for `budget`."""
        picks = self.picks(budget)
        arch = self.space.architecture(picks)
        counts = accounting.count_params(arch.model_config(self.config))
        full = accounting.count_params(self.config)
        achieved = float(self.cost.relative(one_hot_picks(self.space, picks)))
        lo, hi = window(self.ecfg.budget_mode, self.ecfg.budget_tolerance)
        return {
            "budget": budget, "budget_type": self.ecfg.budget_type, "architecture": arch.to_dict(),
            "total_params": counts.total_params, "active_params": counts.active_params,
            "target": budget, "achieved": achieved, "relative_cost": achieved,
            "budget_mode": self.ecfg.budget_mode, "budget_tolerance": self.ecfg.budget_tolerance,
            "held": None if self.ecfg.budget_mode == "none" else lo - 1e-9 <= achieved / budget - 1 <= hi + 1e-9,
            "total_fraction": counts.total_params / full.total_params,
            "active_fraction": counts.active_params / full.active_params,
        }

    def forward(self, input_ids: torch.Tensor, budget: float, **kwargs) -> torch.Tensor:
        """Logits of the submodel the router picks for `budget` (deterministic). kwargs go to
        `HybridLM.forward` (seq_idx for packed rows, head, attention_mask, ...)."""
        masks = IndexSets.prefix(self.config, self.architecture(budget)).masks(device=input_ids.device)
        return self.model(input_ids, masks=masks, **kwargs)

    def forward_sampled(self, input_ids: torch.Tensor, budget: float, tau: float, generator=None, **kwargs):
        """Training forward: Gumbel picks; returns (logits, picks) so the caller adds the router loss.
        kwargs go to `HybridLM.forward` (seq_idx for packed rows, head, ...)."""
        vec = self.budget_vector(budget).to(input_ids.device)
        if budget >= 1.0:  # the parent itself: no router, no masks
            picks = {a: torch.nn.functional.one_hot(torch.tensor(0), len(c)).float().to(input_ids.device)
                     for a, c in self.space.choices.items()}
            return self.model(input_ids, **kwargs), picks
        picks = self.router.sample(vec, tau, generator)
        masks = Masks(**{MASK_FIELD[a]: p.to(input_ids.device) @ getattr(self, f"table_{a}") for a, p in picks.items()})
        # one-hot pick (value) × mask table = exactly the prefix masks of that choice
        return self.model(input_ids, masks=masks, **kwargs), picks


def cost_line(info: dict) -> str:
    """`describe` → "target 0.500 active_params, achieved 0.497 (band ±2%: held)"; budget_mode none
    (no window) gives the deviation instead: "achieved 0.793 (budget_mode none: +5.7%)"."""
    head = f"target {info['target']:.3f} {info['budget_type']}, achieved {info['achieved']:.3f}"
    if info["budget_mode"] == "none":
        return f"{head} (budget_mode none: {info['achieved'] / info['target'] - 1:+.1%})"
    mode = "ceiling" if info["budget_mode"] == "ceiling" else f"band ±{info['budget_tolerance'] * 100:g}%"
    return f"{head} ({mode}: {'held' if info['held'] else 'NOT held'})"
