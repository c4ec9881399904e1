"""Architecture → index sets: the one place that decides which components a submodel keeps.

After sorting (star_elastic.elastic.sort) the most important components come first on every axis,
so a nested submodel keeps a *prefix*: the first `hidden` channels, the first `experts` experts,
the first `k` heads of every KV group / SSM group (so grouped-query and grouped-SSM structure
stays standard), the first channels of every intermediate size. `IndexSets` turns an
`Architecture` into the index tensors; three things use them and nothing else decides:
  - `masks()`        0/1 masks for the elastic (masked) forward of the full model,
  - `slice_state()`  gathers a standalone smaller model in memory (`slice_model`),
  - `quant.export.TensorSlicer`, which slices a checkpoint on disk one tensor at a time
                     (star_elastic.slicing), packed FP8 / NVFP4 with the indices mapped to bytes and scale blocks.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path

import torch

from star_elastic.config import ConfigError, ModelConfig
from star_elastic.model.hybrid import HybridLM, Masks

# Axes in a fixed order; "depth" is the list of kept layers.
AXES = ("hidden", "attn_heads", "mamba_heads", "experts", "expert_inter", "shared_inter", "mlp_inter", "depth")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Active size per axis. Head counts are per group (KV group for attention, SSM group for Mamba)."""

    hidden: int
    attn_heads: int
    mamba_heads: int
    experts: int
    expert_inter: int
    shared_inter: int
    mlp_inter: int
    layers: tuple[int, ...]
    """Kept layer indices of the full model, ascending."""

    @classmethod
    def full(cls, cfg: ModelConfig) -> Architecture:
        return cls(
            hidden=cfg.hidden_size,
            attn_heads=cfg.num_attention_heads // cfg.num_key_value_heads,
            mamba_heads=cfg.mamba_num_heads // cfg.n_groups,
            experts=cfg.n_routed_experts,
            expert_inter=cfg.moe_intermediate_size,
            shared_inter=cfg.moe_shared_expert_intermediate_size,
            mlp_inter=cfg.intermediate_size,
            layers=tuple(range(cfg.num_layers)),
        )

    def validate(self, cfg: ModelConfig) -> None:
        full = Architecture.full(cfg)
        for f in dataclasses.fields(self):
            if f.name == "layers":
                continue
            value, limit = getattr(self, f.name), getattr(full, f.name)
            if not isinstance(value, int) or not 1 <= value <= limit:
                raise ConfigError(f"architecture {f.name}={value!r} outside 1..{limit}")
        if self.experts < cfg.num_experts_per_tok:
            raise ConfigError(f"architecture experts={self.experts} is below top-k={cfg.num_experts_per_tok}")
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[-1] >= cfg.num_layers:
            raise ConfigError(f"architecture layers={self.layers} must be ascending unique indices < {cfg.num_layers}")

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config of the physically sliced model: a standard `nemotron_h` config."""
        self.validate(cfg)
        return cfg.replace(
            hidden_size=self.hidden,
            num_attention_heads=self.attn_heads * cfg.num_key_value_heads,
            mamba_num_heads=self.mamba_heads * cfg.n_groups,
            n_routed_experts=self.experts,
            moe_intermediate_size=self.expert_inter,
            moe_shared_expert_intermediate_size=self.shared_inter,
            intermediate_size=self.mlp_inter,
            pattern="".join(cfg.pattern[i] for i in self.layers),
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Architecture:
        return cls(**{**d, "layers": tuple(d["layers"])})


# --- explicit architectures (`slice CKPT --arch`, `generate --arch-file`) ----------------------
ARCH_NAMES = ("hidden", "attn_heads", "mamba_heads", "experts", "expert_inter", "shared_inter", "mlp_inter", "layers")


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """`0-11+14+20-25` (inclusive ranges joined by '+') → kept layer indices, ascending."""
    kept: set[int] = set()
    for part in text.split("+"):
        lo, _, hi = part.strip().partition("-")
        try:
            kept.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ConfigError(f"architecture layers={text!r}: expected ranges like 0-11+14 (indices < {num_layers})") from None
    return tuple(sorted(kept))


def make_arch(sizes: dict, cfg: ModelConfig, source: str = "architecture") -> Architecture:
    """Per-axis sizes (any subset of ARCH_NAMES; the rest stay full) → a validated Architecture.

    Head counts are per group: `attn_heads` per KV group, `mamba_heads` per SSM group. `layers` is
    a list of kept layer indices (or the text form of `parse_layers`).
    """
    unknown = sorted(set(sizes) - set(ARCH_NAMES))
    if unknown:
        raise ConfigError(f"{source}: unknown axis {unknown[0]!r}; use {', '.join(ARCH_NAMES)}")
    sizes = dict(sizes)
    if isinstance(sizes.get("layers"), str):
        sizes["layers"] = parse_layers(sizes["layers"], cfg.num_layers)
    if "layers" in sizes:
        if not isinstance(sizes["layers"], (list, tuple)) or not all(type(i) is int for i in sizes["layers"]):
            raise ConfigError(f"{source}: layers must be a list of layer indices, got {sizes['layers']!r}")
        sizes["layers"] = tuple(sizes["layers"])
    arch = dataclasses.replace(Architecture.full(cfg), **sizes)
    try:
        arch.validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return arch


def parse_arch(text: str, cfg: ModelConfig) -> Architecture:
    """`hidden=2048,mamba_heads=6,experts=96,layers=0-23` → Architecture (unnamed axes stay full)."""
    sizes: dict = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq:
            raise ConfigError(f"--arch {text!r}: expected name=value items, got {item!r}")
        if name == "layers":
            sizes[name] = value
            continue
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"--arch {text!r}: {name}={value!r} is not an integer") from None
    return make_arch(sizes, cfg, f"--arch {text!r}")


def load_arch_file(path, cfg: ModelConfig) -> dict[str, Architecture]:
    """variants.json: `{"23b": {"hidden": 2048, ...}, "12b": "hidden=1536,..."}` → name → Architecture."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the architecture file ({err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a JSON object of variant name → sizes, e.g. {{\"12b\": {{\"hidden\": 1536}}}}")
    out = {}
    for name, sizes in data.items():
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{path}: variant name {name!r} cannot be a folder name")
        if isinstance(sizes, str):
            out[name] = parse_arch(sizes, cfg)
        elif isinstance(sizes, dict):
            out[name] = make_arch(sizes, cfg, f"{path}: variant {name!r}")
        else:
            raise ConfigError(f"{path}: variant {name!r} must be an object of sizes or a 'hidden=...,...' string")
    return out


def _grouped_prefix(groups: int, per_group: int, keep: int) -> torch.Tensor:
    """First `keep` members of each of `groups` consecutive groups of size `per_group`."""
    return (torch.arange(groups)[:, None] * per_group + torch.arange(keep)[None, :]).reshape(-1)


def _channels(units: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices of whole units (heads) of `width` channels each."""
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


class IndexSets:
    """Index tensors along every sliceable dimension of one config.

    Built from an `Architecture` (`IndexSets.prefix`: the nested submodel) or from full-length
    permutations (`star_elastic.elastic.sort`: the importance order). `expert_inter` may be
    (E, I): one order per expert, since each expert's channels can be ranked on their own.
    """

    def __init__(self, cfg: ModelConfig, hidden, q_heads, mamba_heads, experts, expert_inter, shared_inter,
                 mlp_inter, layers):
        self.cfg = cfg
        self.hidden, self.q_heads, self.mamba_heads, self.experts = hidden, q_heads, mamba_heads, experts
        self.expert_inter, self.shared_inter, self.mlp_inter, self.layers = expert_inter, shared_inter, mlp_inter, layers

    @classmethod
    def prefix(cls, cfg: ModelConfig, arch: Architecture) -> IndexSets:
        """The nested submodel `arch`: a prefix on every axis (per group for grouped heads)."""
        arch.validate(cfg)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        sets = cls(
            cfg,
            hidden=torch.arange(arch.hidden),
            q_heads=_grouped_prefix(cfg.num_key_value_heads, rep, arch.attn_heads),
            mamba_heads=_grouped_prefix(cfg.n_groups, cfg.mamba_num_heads // cfg.n_groups, arch.mamba_heads),
            experts=torch.arange(arch.experts),
            expert_inter=torch.arange(arch.expert_inter),
            shared_inter=torch.arange(arch.shared_inter),
            mlp_inter=torch.arange(arch.mlp_inter),
            layers=torch.tensor(arch.layers),
        )
        sets.arch = arch
        return sets

    # --- derived sets ----------------------------------------------------------------------
    @cached_property
    def q_channels(self) -> torch.Tensor:
        """Rows of q_proj / columns of o_proj."""
        return _channels(self.q_heads, self.cfg.head_dim)

    @cached_property
    def mamba_inner(self) -> torch.Tensor:
        """Channels of the kept SSM heads within the inner size (z, x, gated norm, out_proj)."""
        return _channels(self.mamba_heads, self.cfg.mamba_head_dim)

    @cached_property
    def mamba_conv(self) -> torch.Tensor:
        """conv1d channels [x | B | C]: kept heads' x, all of B and C (shared per group, kept)."""
        inner, bc = self.cfg.mamba_inner, 2 * self.cfg.n_groups * self.cfg.ssm_state_size
        return torch.cat([self.mamba_inner, inner + torch.arange(bc)])

    @cached_property
    def mamba_in_proj(self) -> torch.Tensor:
        """in_proj rows [z | x | B | C | dt]."""
        inner = self.cfg.mamba_inner
        return torch.cat([self.mamba_inner, inner + self.mamba_conv, inner + self.cfg.mamba_conv_dim + self.mamba_heads])

    # --- the two consumers ------------------------------------------------------------------
    def masks(self, dtype: torch.dtype = torch.float32, device=None) -> Masks:
        """0/1 masks of the full model's sizes for the elastic forward (prefix sets only)."""
        cfg = self.cfg

        def mask(n: int, idx: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype).index_fill_(0, idx, 1).to(device)

        full = Architecture.full(cfg)
        return Masks(
            hidden=None if self.arch.hidden == full.hidden else mask(cfg.hidden_size, self.hidden),
            attn_heads=None if self.arch.attn_heads == full.attn_heads else mask(cfg.num_attention_heads, self.q_heads),
            mamba_heads=None if self.arch.mamba_heads == full.mamba_heads else mask(cfg.mamba_num_heads, self.mamba_heads),
            experts=None if self.arch.experts == full.experts else mask(cfg.n_routed_experts, self.experts),
            expert_inter=None if self.arch.expert_inter == full.expert_inter else mask(cfg.moe_intermediate_size, self.expert_inter),
            shared_inter=None if self.arch.shared_inter == full.shared_inter else mask(
                cfg.moe_shared_expert_intermediate_size, self.shared_inter),
            mlp_inter=None if self.arch.mlp_inter == full.mlp_inter else mask(cfg.intermediate_size, self.mlp_inter),
            layers=None if self.arch.layers == full.layers else mask(cfg.num_layers, self.layers),
        )

    def rule(self, key: str) -> dict[int, torch.Tensor]:
        """For a model state-dict key: dim → indices to keep (dims not listed are kept whole)."""
        leaf = key.split(".mixer.", 1)[-1] if ".mixer." in key else key
        kind = self.cfg.pattern[int(key.split(".")[2])] if key.startswith("backbone.layers.") else None
        h = self.hidden
        if key in ("backbone.embeddings.weight", "lm_head.weight"):
            return {1: h}
        if key == "backbone.norm_f.weight" or key.endswith(".norm.weight") and ".mixer." not in key:
            return {0: h}
        table = _RULES.get((kind, leaf))
        if table is None:
            raise KeyError(f"no slicing rule for {key!r}")
        return {dim: getattr(self, name) for dim, name in table.items()}


# (block kind, parameter name under .mixer.) → {dim: IndexSets attribute}
_RULES: dict[tuple[str, str], dict[int, str]] = {
    ("M", "in_proj.weight"): {0: "mamba_in_proj", 1: "hidden"},
    ("M", "in_proj.bias"): {0: "mamba_in_proj"},
    ("M", "conv1d.weight"): {0: "mamba_conv"},
    ("M", "conv1d.bias"): {0: "mamba_conv"},
    ("M", "dt_bias"): {0: "mamba_heads"},
    ("M", "A_log"): {0: "mamba_heads"},
    ("M", "D"): {0: "mamba_heads"},
    ("M", "norm.weight"): {0: "mamba_inner"},
    ("M", "out_proj.weight"): {0: "hidden", 1: "mamba_inner"},
    ("M", "out_proj.bias"): {0: "hidden"},
    ("*", "q_proj.weight"): {0: "q_channels", 1: "hidden"},
    ("*", "k_proj.weight"): {1: "hidden"},
    ("*", "v_proj.weight"): {1: "hidden"},
    ("*", "o_proj.weight"): {0: "hidden", 1: "q_channels"},
    ("E", "gate.weight"): {0: "experts", 1: "hidden"},
    ("E", "gate.e_score_correction_bias"): {0: "experts"},
    ("E", "experts.up_proj"): {0: "experts", 1: "expert_inter", 2: "hidden"},
    ("E", "experts.down_proj"): {0: "experts", 1: "hidden", 2: "expert_inter"},
    ("E", "shared_experts.up_proj.weight"): {0: "shared_inter", 1: "hidden"},
    ("E", "shared_experts.up_proj.bias"): {0: "shared_inter"},
    ("E", "shared_experts.down_proj.weight"): {0: "hidden", 1: "shared_inter"},
    ("E", "shared_experts.down_proj.bias"): {0: "hidden"},
    ("-", "up_proj.weight"): {0: "mlp_inter", 1: "hidden"},
    ("-", "up_proj.bias"): {0: "mlp_inter"},
    ("-", "down_proj.weight"): {0: "hidden", 1: "mlp_inter"},
    ("-", "down_proj.bias"): {0: "hidden"},
}


def gather(t: torch.Tensor, rule: dict[int, torch.Tensor]) -> torch.Tensor:
    """Keep `rule[dim]` indices along each listed dim.

    A 2D index (E, n) on a dim > 0 of an (E, ...) tensor selects per leading entry (per expert).
    Rules are applied leading dim first, so a per-expert index meets the experts already chosen.
    """
    for dim, idx in sorted(rule.items()):
        idx = idx.to(t.device)
        if idx.dim() == 1:
            t = t.index_select(dim, idx)
        else:
            shape = [t.shape[0]] + [1] * (t.dim() - 1)
            shape[dim] = idx.shape[1]
            expand = list(t.shape)
            expand[dim] = idx.shape[1]
            t = torch.take_along_dim(t, idx[: t.shape[0]].view(shape).expand(expand), dim=dim)
    return t.contiguous()


def renumber_layer(key: str, new_index: dict[int, int]) -> str | None:
    """backbone.layers.N.… → backbone.layers.M.… for kept layers; None for dropped ones."""
    if not key.startswith("backbone.layers."):
        return key
    parts = key.split(".")
    old = int(parts[2])
    if old not in new_index:
        return None
    parts[2] = str(new_index[old])
    return ".".join(parts)


def slice_state(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: Architecture) -> dict[str, torch.Tensor]:
    """A full model's state dict (model key names) → the sliced model's state dict."""
    sets = IndexSets.prefix(cfg, arch)
    new_index = {old: new for new, old in enumerate(arch.layers)}
    out = {}
    for key, t in state.items():
        new_key = renumber_layer(key, new_index)
        if new_key is not None:
            out[new_key] = gather(t, sets.rule(key))
    return out


def slice_model(model: HybridLM, arch: Architecture) -> HybridLM:
    """A new HybridLM holding copies of the sliced weights (dtype and device kept)."""
    state = slice_state(model.state_dict(), model.config, arch)
    return HybridLM.from_state_dict(arch.model_config(model.config), state, model.tokenizer).eval()
