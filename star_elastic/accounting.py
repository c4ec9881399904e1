"""Parameter and memory accounting for Nemotron-H models, from the config alone.

Everything here is arithmetic on a `ModelConfig`; no weights are read and no model is built, so a
30B config is counted in microseconds. The counts are those of the architecture the config
describes, which is the parameter set of transformers' `NemotronHForCausalLM` (tests check parity
on tiny random models) except for three flags transformers 5.x ignores, all off in every released
Nemotron-H config:

* `attention_bias`: transformers builds q/k/v/o with `bias=False`, so `ModelConfig` rejects it.
* `mlp_bias` applies to the shared expert and dense MLPs only; routed experts (3D tensors in
  transformers and in HybridLM) have no biases.
* `tie_word_embeddings`: transformers leaves `NemotronHForCausalLM._tied_weights_keys` empty, so
  its LM head stays a separate matrix; counted here once, as tying means.

The router's `e_score_correction_bias` is a buffer, not a parameter, and is not counted.

Elastic (nested) sub-networks are counted the same way: build a reduced config with
`cfg.replace(hidden_size=..., n_routed_experts=..., ...)` and pass it to any function here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from star_elastic.config import BLOCK_CHARS, ConfigError, ModelConfig

# Breakdown keys, in the order `info` prints them.
COMPONENTS = (
    "embedding", "lm_head", "mamba", "attention", "mlp",
    "moe_routed_experts", "moe_shared", "moe_router", "norms",
)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model configuration."""

    total_params: int
    """Every parameter, tied embeddings counted once."""
    active_params: int
    """Parameters one token passes through: all but the routed experts outside the top-k."""
    breakdown: dict[str, int]
    """Total parameters per component (keys of `COMPONENTS`); sums to `total_params`."""
    active_breakdown: dict[str, int]
    """Active parameters per component; sums to `active_params`."""


# --- building blocks on plain sizes ---------------------------------------------------------


def linear_params(n_in: int, n_out: int, bias: bool = False) -> int:
    """An `nn.Linear(n_in, n_out)`: weight plus optional bias."""
    return n_in * n_out + (n_out if bias else 0)


def mlp_params(hidden: int, inter: int, bias: bool = False) -> int:
    """A non-gated up/down MLP (Nemotron-H's relu2 MLP, also the shared expert)."""
    return linear_params(hidden, inter, bias) + linear_params(inter, hidden, bias)


def expert_params(hidden: int, inter: int) -> int:
    """One routed expert: an up/down MLP (its slices of transformers' 3D expert tensors)."""
    return mlp_params(hidden, inter, bias=False)


# --- one mixer of each block type -----------------------------------------------------------


def mamba_layer_params(cfg: ModelConfig) -> int:
    """A Mamba-2 mixer, without the block's pre-norm."""
    inner, conv_dim, heads = cfg.mamba_inner, cfg.mamba_conv_dim, cfg.mamba_num_heads
    # in_proj emits [z | x B C | dt]: the gate, the conv input and one time step per head.
    in_proj = linear_params(cfg.hidden_size, inner + conv_dim + heads, cfg.mamba_proj_bias)
    conv1d = conv_dim * cfg.conv_kernel + (conv_dim if cfg.use_conv_bias else 0)
    per_head = 3 * heads  # dt_bias, A_log, D
    gated_norm = inner
    out_proj = linear_params(inner, cfg.hidden_size, cfg.mamba_proj_bias)
    return in_proj + conv1d + per_head + gated_norm + out_proj


def attention_layer_params(cfg: ModelConfig) -> int:
    """A grouped-query attention mixer, without the block's pre-norm."""
    q_width = cfg.num_attention_heads * cfg.head_dim
    kv_width = cfg.num_key_value_heads * cfg.head_dim
    bias = cfg.attention_bias
    return (
        linear_params(cfg.hidden_size, q_width, bias)
        + 2 * linear_params(cfg.hidden_size, kv_width, bias)
        + linear_params(q_width, cfg.hidden_size, bias)
    )


def mlp_layer_params(cfg: ModelConfig) -> int:
    """A dense MLP mixer, without the block's pre-norm."""
    return mlp_params(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)


def moe_layer_parts(cfg: ModelConfig, active: bool = False) -> dict[str, int]:
    """An MoE mixer split into routed experts, shared expert and router gate.

    With `active=True` only the `num_experts_per_tok` experts a token is routed to count.
    """
    n_experts = cfg.num_experts_per_tok if active else cfg.n_routed_experts
    expert = expert_params(cfg.hidden_size, cfg.moe_intermediate_size)
    return {
        "moe_routed_experts": n_experts * expert,
        "moe_shared": mlp_params(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size, cfg.mlp_bias),
        # The router is used by every token, so it is active in full.
        "moe_router": cfg.n_routed_experts * cfg.hidden_size,
    }


def moe_layer_params(cfg: ModelConfig, active: bool = False) -> int:
    """An MoE mixer, without the block's pre-norm; `active` as in `moe_layer_parts`."""
    return sum(moe_layer_parts(cfg, active).values())


def mixer_params(cfg: ModelConfig, block: str, active: bool = False) -> int:
    """The mixer of a block given by its pattern character (M * E -)."""
    if block == "M":
        return mamba_layer_params(cfg)
    if block == "*":
        return attention_layer_params(cfg)
    if block == "E":
        return moe_layer_params(cfg, active)
    if block == "-":
        return mlp_layer_params(cfg)
    raise ValueError(f"unknown block type {block!r}; use one of {sorted(BLOCK_CHARS)}")


def layer_params(cfg: ModelConfig, block: str, active: bool = False) -> int:
    """A whole block: its RMSNorm weight plus its mixer."""
    return cfg.hidden_size + mixer_params(cfg, block, active)


# --- whole model ----------------------------------------------------------------------------


def _breakdown(cfg: ModelConfig, active: bool) -> dict[str, int]:
    """Per-component parameters of the whole model (total or active)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    counts["embedding"] = cfg.vocab_size * cfg.hidden_size
    # A tied LM head is the embedding matrix itself: counted once, under "embedding".
    counts["lm_head"] = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    counts["norms"] = (cfg.num_layers + 1) * cfg.hidden_size  # one per block plus the final norm
    for block in cfg.pattern:
        if block == "E":
            for key, n in moe_layer_parts(cfg, active).items():
                counts[key] += n
        else:
            counts[BLOCK_CHARS[block]] += mixer_params(cfg, block)
    return counts


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Total and active parameter counts of `cfg`, with a per-component breakdown."""
    total = _breakdown(cfg, active=False)
    active = _breakdown(cfg, active=True)
    return ParamCounts(
        total_params=sum(total.values()),
        active_params=sum(active.values()),
        breakdown=total,
        active_breakdown=active,
    )


# --- inference memory -----------------------------------------------------------------------


def kv_cache_layer_bytes(cfg: ModelConfig, batch_size: int, context_len: int, kv_bytes: int = 2) -> int:
    """Keys and values of one attention layer for `batch_size` sequences of `context_len` tokens."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * context_len * batch_size * kv_bytes


def ssm_state_layer_bytes(cfg: ModelConfig, batch_size: int, state_bytes: int = 4) -> int:
    """Recurrent state of one Mamba layer: the SSM state plus the conv1d's last inputs.

    Unlike the KV cache it does not grow with the context.
    """
    ssm = cfg.mamba_inner * cfg.ssm_state_size
    conv = cfg.mamba_conv_dim * (cfg.conv_kernel - 1)
    return batch_size * (ssm + conv) * state_bytes


def kv_cache_bytes(cfg: ModelConfig, batch_size: int, context_len: int, kv_bytes: int = 2) -> int:
    """Keys and values of every attention layer."""
    return cfg.pattern.count("*") * kv_cache_layer_bytes(cfg, batch_size, context_len, kv_bytes)


def ssm_state_bytes(cfg: ModelConfig, batch_size: int, state_bytes: int = 4) -> int:
    """Recurrent state of every Mamba layer."""
    return cfg.pattern.count("M") * ssm_state_layer_bytes(cfg, batch_size, state_bytes)


def memory_bytes(
    cfg: ModelConfig,
    batch_size: int,
    context_len: int,
    bytes_per_param: int = 2,
    kv_bytes: int = 2,
    state_bytes: int = 4,
) -> dict[str, int]:
    """Inference memory in bytes: weights, KV cache, SSM state and their total.

    Activations and allocator overhead are not included.
    """
    for name, value in (("batch_size", batch_size), ("context_len", context_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    out = {
        "weights": count_params(cfg).total_params * bytes_per_param,
        "kv_cache": kv_cache_bytes(cfg, batch_size, context_len, kv_bytes),
        "ssm_state": ssm_state_bytes(cfg, batch_size, state_bytes),
    }
    out["total"] = sum(out.values())
    return out


# --- the `info` subcommand ------------------------------------------------------------------


def format_count(n: int) -> str:
    """`31577937344` -> `31,577,937,344 (31.58 B)`."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f} {unit})"
    return f"{n:,}"


def model_info(cfg: ModelConfig) -> dict[str, Any]:
    """The facts `info` reports, as a JSON-ready dict."""
    counts = count_params(cfg)
    return {
        "pattern": cfg.pattern,
        "num_layers": cfg.num_layers,
        "layer_counts": {name: cfg.pattern.count(c) for c, name in BLOCK_CHARS.items()},
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "mamba_num_heads": cfg.mamba_num_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "ssm_state_size": cfg.ssm_state_size,
        "n_groups": cfg.n_groups,
        "intermediate_size": cfg.intermediate_size,
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "total_params": counts.total_params,
        "active_params": counts.active_params,
        "breakdown": counts.breakdown,
        "active_breakdown": counts.active_breakdown,
    }


def _config_path(path: str | Path) -> Path:
    """`PATH/config.json` for a model directory; a config.json path itself is accepted too."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise ConfigError(f"{path}: model directory not found")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a model directory")
    return path / "config.json"


def _format_text(info: dict[str, Any], source: Path) -> str:
    """The human-readable report of `info`."""
    layers = ", ".join(f"{n} {name}" for name, n in info["layer_counts"].items())
    lines = [
        f"config          {source}",
        f"pattern         {info['pattern']}",
        f"layers          {info['num_layers']} ({layers})",
        f"hidden_size     {info['hidden_size']}    vocab_size {info['vocab_size']}"
        f"    tied embeddings {info['tie_word_embeddings']}",
        f"attention       {info['num_attention_heads']} heads, {info['num_key_value_heads']} kv heads,"
        f" head_dim {info['head_dim']}",
        f"mamba           {info['mamba_num_heads']} heads x {info['mamba_head_dim']},"
        f" state {info['ssm_state_size']}, {info['n_groups']} groups",
        f"moe             {info['n_routed_experts']} experts, top-{info['num_experts_per_tok']},"
        f" expert {info['moe_intermediate_size']}, shared {info['moe_shared_expert_intermediate_size']}",
        f"mlp             intermediate {info['intermediate_size']}",
        f"total_params    {format_count(info['total_params'])}",
        f"active_params   {format_count(info['active_params'])}",
        "breakdown (total / active):",
    ]
    width = max(len(f"{n:,}") for n in info["breakdown"].values())
    for key, n in info["breakdown"].items():
        lines.append(f"  {key:<20}{n:>{width},}  {info['active_breakdown'][key]:>{width},}")
    return "\n".join(lines)


@dataclasses.dataclass
class InfoConfig:
    """`star-elastic info PATH`."""

    path: str = ""
    """Model directory (config.json is enough; weights are not read)."""
    json: bool = False
    """Print one JSON object on standard output."""


def info_command(path: str | Path, as_json: bool = False) -> int:
    """`star-elastic info PATH`: print a model's pattern, sizes and parameter counts.

    Reads only `PATH/config.json`. With `as_json` standard output is one JSON object and nothing
    else. Raises `ConfigError` naming the path when the directory or config is missing or invalid.
    """
    source = _config_path(path)
    cfg = ModelConfig.from_json(source)
    info = model_info(cfg)
    if as_json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_format_text(info, source))
    return 0
