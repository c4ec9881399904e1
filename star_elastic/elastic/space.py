"""The choice space: for each elastic axis, the sizes the router may pick (largest first).

Choices come from `ElasticConfig.fractions` (rounded so that input dimensions stay multiples of
`ElasticConfig.multiple`) or from explicit lists, and are validated against the model config here,
once, with messages that name the axis and the value. The default grid is feasible for every valid
config: each axis's choices include its full size and never exceed it, whatever its divisibility
(an axis below `multiple`, or with no multiple of it below its size, keeps its full size only).
"""

from __future__ import annotations

import dataclasses

import torch

from star_elastic.config import ConfigError, ElasticConfig, ModelConfig
from star_elastic.elastic.arch import Architecture, IndexSets


def _axis_full(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Axis → (full size, input channels per unit). Heads are kept per group, so a group's kept
    run of channels is `k * head_dim` long: that run must stay whole in NVFP4 blocks."""
    return {
        "hidden": (cfg.hidden_size, 1),
        "attn_heads": (cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim),
        "mamba_heads": (cfg.mamba_num_heads // cfg.n_groups, cfg.mamba_head_dim),
        "experts": (cfg.n_routed_experts, 0),
        "expert_inter": (cfg.moe_intermediate_size, 1),
        "shared_inter": (cfg.moe_shared_expert_intermediate_size, 1),
        "mlp_inter": (cfg.intermediate_size, 1),
        "depth": (cfg.num_layers, 0),
    }


def _from_fraction(axis: str, full: int, unit: int, f: float, multiple: int, cfg: ModelConfig) -> int:
    """The size for fraction `f` of `full`: never above `full`, and `full` itself for f = 1."""
    if unit == 1:  # channels: round to the multiple, within multiple .. the largest multiple below full
        if f == 1.0 or full < multiple:
            return full
        return min(max(multiple, int(round(full * f / multiple)) * multiple), full // multiple * multiple)
    if axis == "experts":
        return max(cfg.num_experts_per_tok, int(round(full * f)))
    if unit:  # heads: the nearest count whose kept run of k * head_dim channels fills whole blocks
        feasible = [k for k in range(1, full) if (k * unit) % multiple == 0] + [full]
        return min(feasible, key=lambda k: (abs(k - full * f), -k))
    return max(1, int(round(full * f)))


@dataclasses.dataclass(frozen=True)
class ChoiceSpace:
    """Per elastic axis, the allowed sizes (descending; the first is the full size)."""

    cfg: ModelConfig
    choices: dict[str, tuple[int, ...]]
    layer_order: tuple[int, ...]
    """Layers from most to least important; depth choice n keeps the first n (in model order)."""

    @classmethod
    def build(cls, cfg: ModelConfig, ecfg: ElasticConfig, layer_order: list[int] | None = None) -> ChoiceSpace:
        full = _axis_full(cfg)
        choices = {}
        for axis in ecfg.axes:
            size, unit = full[axis]
            if axis in ecfg.choices:
                values = sorted(set(ecfg.choices[axis]), reverse=True)
            else:
                values = sorted({_from_fraction(axis, size, unit, f, ecfg.multiple, cfg) for f in ecfg.fractions},
                                reverse=True)
            _check(axis, values, size, unit, ecfg.multiple, cfg)
            choices[axis] = tuple(values)
        order = tuple(layer_order) if layer_order is not None else tuple(range(cfg.num_layers))
        if sorted(order) != list(range(cfg.num_layers)):
            raise ConfigError(f"layer_order must be a permutation of 0..{cfg.num_layers - 1}, got {list(order)}")
        return cls(cfg, choices, order)

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.choices)

    def architecture(self, picks: dict[str, int]) -> Architecture:
        """Choice index per axis → Architecture (axes not elastic stay full)."""
        full = Architecture.full(self.cfg)
        sizes = {axis: self.choices[axis][i] for axis, i in picks.items()}
        depth = sizes.pop("depth", None)
        layers = full.layers if depth is None else tuple(sorted(self.layer_order[:depth]))
        return dataclasses.replace(full, **sizes, layers=layers)

    def mask_table(self, axis: str, dtype=torch.float32) -> torch.Tensor:
        """(n_choices, axis length) 0/1 masks, one row per choice, from `IndexSets.prefix`."""
        rows = []
        for i in range(len(self.choices[axis])):
            arch = self.architecture({axis: i})
            masks = IndexSets.prefix(self.cfg, arch).masks(dtype)
            field = {"attn_heads": "attn_heads", "mamba_heads": "mamba_heads", "depth": "layers"}.get(axis, axis)
            m = getattr(masks, field)
            n = _mask_length(self.cfg, axis)
            rows.append(torch.ones(n, dtype=dtype) if m is None else m)
        return torch.stack(rows)


def _mask_length(cfg: ModelConfig, axis: str) -> int:
    return {
        "hidden": cfg.hidden_size, "attn_heads": cfg.num_attention_heads, "mamba_heads": cfg.mamba_num_heads,
        "experts": cfg.n_routed_experts, "expert_inter": cfg.moe_intermediate_size,
        "shared_inter": cfg.moe_shared_expert_intermediate_size, "mlp_inter": cfg.intermediate_size,
        "depth": cfg.num_layers,
    }[axis]


def _check(axis: str, values: list[int], full: int, unit: int, multiple: int, cfg: ModelConfig) -> None:
    low = cfg.num_experts_per_tok if axis == "experts" else 1
    bad = [v for v in values if not low <= v <= full]
    if bad:
        raise ConfigError(f"choice {bad[0]} for {axis!r} is outside {low}..{full}")
    if values[0] != full:
        raise ConfigError(f"choices for {axis!r} must include the full size {full}, got {values}")
    if unit:
        off = [v for v in values if (v * unit) % multiple and v != full]
        if off:
            raise ConfigError(
                f"choice {off[0]} for {axis!r} keeps runs of {off[0] * unit} input channels, not a multiple of "
                f"elastic.multiple={multiple} (so that NVFP4 blocks of 16 stay whole); pick sizes whose channels "
                f"divide by {multiple}, or lower elastic.multiple if you will not quantize to NVFP4"
            )
