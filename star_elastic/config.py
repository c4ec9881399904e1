"""Typed configuration dataclasses.

Every config is a small dataclass validated in `__post_init__`. `from_dict` rejects unknown keys
with a message naming the key, and `load_yaml` reads a YAML file into any of them, so the CLI,
YAML files and Python callers go through the same checks.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

BLOCK_CHARS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
# transformers' newer `layers_block_type` names, and the older ones some files still carry.
HF_BLOCK_NAMES = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
HF_LEGACY_NAMES = {"mamba": "M", "attention": "*", "moe": "E", "mlp": "-"}


class ConfigError(ValueError):
    """Bad configuration value or key; the message names the key and the source."""


def check_out_dir(out, flag: str = "--out", empty: bool = False) -> Path:
    """An output folder we may write: not a file, under no file; with `empty`, absent or empty
    (so that nothing existing is overwritten)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: exists and is a file; name a folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{flag} {out}: {parent} is a file, not a folder")
    if empty and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{flag} {out}: folder exists and is not empty; name a new folder or remove it")
    return out


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting keys the dataclass does not define.

    A nested block (a field typed as a dataclass) is built from its mapping by the same rules, on
    top of the field's default: the keys given replace the default's. Every message names the
    source and the key's full dotted path (`elastic.budgets`)."""
    return _construct(cls, _kwargs(cls, data, source, prefix), source, prefix)


def _kwargs(cls: type, data: Any, source: str, prefix: str) -> dict[str, Any]:
    """`data`'s keys checked against `cls`'s fields and its values against their types."""
    if not isinstance(data, dict):
        where = f"{source}: {prefix.rstrip('.')}" if prefix else source
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
                          f"valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        block = block_type(hints[key])
        if block is not None:
            kwargs[key] = _block(block, fields[key], value, source, prefix + key + ".")
        else:
            kwargs[key] = _typed(f"{source}: {prefix}{key}", value, hints[key])
    return kwargs


def _construct(make, kwargs: dict[str, Any], source: str, prefix: str):
    """`make(**kwargs)` with its validation errors located at the source and block."""
    try:
        return make(**kwargs)
    except ConfigError as err:
        raise ConfigError(_located(err, source, prefix)) from None
    except TypeError as err:
        raise ConfigError(f"{source}: {prefix}{err}") from None


def _located(err: ConfigError, source: str, prefix: str) -> str:
    """A validation message with the source and the block's path in front (once)."""
    msg = str(err)
    if msg.startswith(f"{source}: "):
        return msg
    return f"{source}: {prefix.rstrip('.') + ': ' if prefix else ''}{msg}"


def block_type(hint: Any) -> type | None:
    """The dataclass of a nested-block field (`X` or `X | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _block(cls: type, f: dataclasses.Field, value: Any, source: str, prefix: str) -> Any:
    """A nested block: an instance as it is, or a mapping laid over the field's default."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')} must be a mapping of {cls.__name__} keys, got {value!r}")
    kwargs = _kwargs(cls, value, source, prefix)
    base = _field_default(f)
    make = cls if base is None else functools.partial(dataclasses.replace, base)
    return _construct(make, kwargs, source, prefix)


def typed_blocks(obj: Any, source: str = "config") -> None:
    """In place, for dataclass `obj` built directly in Python: every nested-block field given as a
    mapping becomes its dataclass (by `from_dict`'s rules), and every `Literal` field is checked.
    Call it first in `__post_init__`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        block = block_type(hints[f.name])
        value = getattr(obj, f.name)
        if block is not None and isinstance(value, dict):
            setattr(obj, f.name, _block(block, f, value, source, f.name + "."))
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            _typed(f.name, value, hints[f.name])


def _typed(where: str, value: Any, hint: Any) -> Any:
    """`value` checked against a field's annotation (int, float, bool, str, dict, Literal, unions,
    tuple[X, ...]); ints are accepted where floats are expected. Other annotations are left to the
    dataclass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _typed(where, value, inner[0])
        for alternative in inner:
            try:
                return _typed(where, value, alternative)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {' or '.join(_kind(a) for a in inner)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        elems = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(elems) != len(value):
            raise ConfigError(f"{where} must have {len(elems)} entries, got {value!r}")
        return tuple(_typed(f"{where}[{i}]", v, h) for i, (v, h) in enumerate(zip(value, elems)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_typed(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: type(v) is int,
          float: lambda v: type(v) in (int, float), str: lambda v: isinstance(v, str),
          dict: lambda v: isinstance(v, dict)}.get(origin or hint)
    if ok is not None and not ok(value):
        raise ConfigError(f"{where} must be {_kind(origin or hint)}, got {value!r}")
    return float(value) if hint is float else value


def _kind(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    names = {float: "a number", dict: "a mapping", int: "an integer", bool: "true or false", str: "a string"}
    return names.get(typing.get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def to_plain(obj: Any) -> Any:
    """A config as plain JSON / YAML data: dataclasses → dicts, tuples → lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file (an empty file is {}); anything else is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def merge_config(path: str | Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """YAML mapping (optional) with overrides on top. None means "not given"; a dotted key such as
    `elastic.budgets` or `engine.dtype` sets one key inside that nested block (at any depth)."""
    data = read_yaml_mapping(path) if path else {}
    for key, value in overrides.items():
        if value is None:
            continue
        *blocks, leaf = key.split(".")
        node, where = data, []
        for block in blocks:
            where.append(block)
            child = node.get(block)
            if child is None:
                child = node[block] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{path or 'config'}: {'.'.join(where)} must be a mapping of keys, got {child!r}")
            else:
                child = node[block] = dict(child)
            node = child
        node[leaf] = value
    return data


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a YAML file into dataclass `cls`."""
    return from_dict(cls, read_yaml_mapping(path), source=str(path))


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass
class ModelConfig:
    """A Nemotron-H hybrid model. Field names follow transformers' `NemotronHConfig`."""

    vocab_size: int = 131072
    """Rows of the embedding and the LM head."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    pattern: str = "M*E-"
    """One character per layer: M Mamba-2, * attention, E mixture of experts, - MLP."""
    num_attention_heads: int = 32
    """Query heads per attention layer."""
    num_key_value_heads: int = 8
    """Key/value heads (grouped-query attention); divides num_attention_heads."""
    head_dim: int = 128
    """Width of one attention head."""
    intermediate_size: int = 21504
    """Hidden width of dense MLP layers."""
    mamba_num_heads: int = 128
    """SSM heads per Mamba-2 layer."""
    mamba_head_dim: int = 64
    """Channels per SSM head; inner size = mamba_num_heads * mamba_head_dim."""
    ssm_state_size: int = 128
    """State size N of each SSM head."""
    n_groups: int = 8
    """SSM groups sharing B/C projections; divides mamba_num_heads."""
    conv_kernel: int = 4
    """Depthwise causal conv1d width."""
    chunk_size: int = 128
    """Chunk length of the SSD scan."""
    use_conv_bias: bool = True
    """conv1d has a bias."""
    mamba_proj_bias: bool = False
    """Mamba in_proj/out_proj have biases (transformers' `use_bias`)."""
    time_step_min: float = 0.001
    """Lower end of the dt init range (transformers' init). transformers' full forward also clamps dt
    to at least this; star_elastic, vLLM, mamba_ssm and transformers' cached decode use
    `time_step_limit` instead (README: known transformers deviation)."""
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    """Clamp (low, high) of dt = softplus(dt + dt_bias), in the scan and in the decode step."""
    n_routed_experts: int = 8
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = 2
    """Experts chosen per token (top-k)."""
    moe_intermediate_size: int = 7688
    """Hidden width of one routed expert."""
    moe_shared_expert_intermediate_size: int = 7688
    """Hidden width of the shared expert."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the normalised routing weights."""
    norm_topk_prob: bool = True
    """Normalise the chosen sigmoid scores to sum 1."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    layer_norm_epsilon: float = 1e-5
    """RMSNorm epsilon (block norms, final norm, gated Mamba norm)."""
    attention_bias: bool = False
    """Must be false: Nemotron-H attention has no biases (transformers ignores the flag)."""
    mlp_bias: bool = False
    """Dense MLP and shared-expert projections have biases (routed experts never do)."""
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    max_position_embeddings: int = 4096
    """Informational: the model has no positional embedding."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
            "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size", "moe_shared_expert_intermediate_size",
        ):
            _positive(name, getattr(self, name))
        if not self.pattern or set(self.pattern) - set(BLOCK_CHARS):
            bad = sorted(set(self.pattern) - set(BLOCK_CHARS)) if self.pattern else "empty"
            raise ConfigError(f"pattern {self.pattern!r}: invalid characters {bad}; use M * E -")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.mamba_num_heads % self.n_groups:
            raise ConfigError(f"mamba_num_heads={self.mamba_num_heads} is not a multiple of n_groups={self.n_groups}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}"
            )
        if self.attention_bias:
            raise ConfigError(
                "attention_bias=true is not supported: transformers' nemotron_h builds attention without biases"
            )
        if self.layer_norm_epsilon <= 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        try:
            low, high = (float(v) for v in self.time_step_limit)
        except (TypeError, ValueError):
            raise ConfigError(f"time_step_limit must be two numbers [low, high], got {self.time_step_limit!r}") from None
        if not 0 <= low < high:
            raise ConfigError(f"time_step_limit must satisfy 0 <= low < high, got {[low, high]}")
        self.time_step_limit = (low, high)

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels through conv1d: [x | B | C]."""
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state_size

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- the transformers `nemotron_h` config.json contract -------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents that transformers' NemotronHConfig reads, both naming styles."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("pattern", "time_step_min")}
        d.update(
            model_type="nemotron_h",
            architectures=["NemotronHForCausalLM"],
            hybrid_override_pattern=self.pattern,
            num_hidden_layers=self.num_layers,
            layers_block_type=[HF_BLOCK_NAMES[c] for c in self.pattern],
            use_bias=self.mamba_proj_bias,
            time_step_min=self.time_step_min,
            mamba_hidden_act="silu",
            mlp_hidden_act="relu2",
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            expand=max(1, self.mamba_inner // self.hidden_size),
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a transformers `nemotron_h` config dict (either layer naming style)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "nemotron_h":
            raise ConfigError(
                f"{source}: model_type {d.get('model_type')!r} is not supported; star-elastic reads 'nemotron_h'"
            )
        pattern = _pattern_from_hf(d, source)
        for key, supported in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")):
            if d.get(key, supported) != supported:
                raise ConfigError(f"{source}: {key}={d[key]!r} is not supported (only {supported!r})")
        for key in ("n_group", "topk_group"):
            if d.get(key, 1) != 1:
                raise ConfigError(f"{source}: {key}={d[key]} is not supported (grouped expert routing); use 1")
        if d.get("moe_latent_size") is not None:
            raise ConfigError(f"{source}: moe_latent_size is not supported")
        if d.get("num_nextn_predict_layers", 0):
            raise ConfigError(f"{source}: multi-token prediction layers are not supported")
        aliases = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_chunk_size": "chunk_size",
                   "mamba_conv_bias": "use_conv_bias", "use_bias": "mamba_proj_bias", "mamba_dt_min": "time_step_min",
                   "mamba_dt_limit": "time_step_limit"}
        fields = {f.name for f in dataclasses.fields(cls)} - {"pattern"}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            key = aliases.get(key, key)
            if key in fields:
                kwargs[key] = _untag_floats(value)
        if "use_bias" in d:  # transformers' mixer reads `use_bias`; `mamba_proj_bias` is informational
            kwargs["mamba_proj_bias"] = d["use_bias"]
        kwargs["pattern"] = pattern
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found (a model directory needs config.json)") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
        return cls.from_hf_dict(d, source=str(path))


def _untag_floats(value: Any) -> Any:
    """transformers >= 5 writes inf / nan in config.json as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    if isinstance(value, list):
        return [_untag_floats(v) for v in value]
    return value


def _pattern_from_hf(d: dict[str, Any], source: str) -> str:
    """Layer pattern from `hybrid_override_pattern` (older files) or `layers_block_type` (newer)."""
    if d.get("layers_block_type") is not None:
        names = {v: k for k, v in HF_BLOCK_NAMES.items()} | HF_LEGACY_NAMES
        unknown = sorted({t for t in d["layers_block_type"] if t not in names})
        if unknown:
            raise ConfigError(f"{source}: layers_block_type has unknown block types {unknown}")
        pattern = "".join(names[t] for t in d["layers_block_type"])
    elif d.get("hybrid_override_pattern"):
        pattern = d["hybrid_override_pattern"]
        bad = sorted(set(pattern) - set(BLOCK_CHARS))
        if bad:
            raise ConfigError(f"{source}: hybrid_override_pattern has unknown characters {bad}")
    else:
        raise ConfigError(f"{source}: neither 'layers_block_type' nor 'hybrid_override_pattern' is set")
    n = d.get("num_hidden_layers")
    if d.get("layers_block_type") is None and n is not None and n != len(pattern):
        raise ConfigError(
            f"{source}: num_hidden_layers={n} but hybrid_override_pattern has {len(pattern)} layers"
        )
    return pattern


BUDGET_TYPES = ("total_params", "active_params", "memory", "latency")
BUDGET_MODES = ("band", "ceiling", "none")
ELASTIC_AXES = ("hidden", "attn_heads", "mamba_heads", "experts", "expert_inter", "shared_inter", "mlp_inter", "depth")


@dataclasses.dataclass
class ElasticConfig:
    """What is elastic and which budgets the router is trained for."""

    budgets: tuple[float, ...] = (1.0, 0.75, 0.5)
    """Target budgets as fractions of the full model's cost, largest first."""
    budget_type: Literal["total_params", "active_params", "memory", "latency"] = "active_params"
    """total_params | active_params | memory (weights + KV cache + SSM state) | latency (profiled table)."""
    fractions: tuple[float, ...] = (1.0, 0.75, 0.5)
    """Default choice grid of every axis, as fractions of the full size."""
    axes: tuple[str, ...] = ("hidden", "attn_heads", "mamba_heads", "experts", "expert_inter", "shared_inter", "mlp_inter")
    """Elastic axes; add "depth" for layer skipping (off by default)."""
    choices: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """Explicit choice lists per axis (absolute sizes; heads per group), overriding `fractions`."""
    multiple: int = 16
    """Channel choices on input dimensions are rounded to multiples of this (NVFP4 blocks stay whole)."""
    memory_batch: int = 1
    """Batch size assumed by the `memory` budget type."""
    memory_context: int = 4096
    """Context length assumed by the `memory` budget type."""
    router_hidden: int = 64
    """Width of each axis's router MLP."""
    budget_mode: Literal["band", "ceiling", "none"] = "band"
    """band: every trained budget's final architecture costs within ±budget_tolerance of its target;
    ceiling: it costs at most the target (memory budgets are ceilings), preferably within 2·tolerance below;
    none: budgets are not held (plain squared router loss, the cost fit ends on the grid's closest
    architecture and training's drift is kept): the behaviour before budgets were held, for comparison."""
    budget_tolerance: float = 0.02
    """Relative tolerance of `budget_mode` (0.02: ±2% of the target cost)."""
    nested: bool = False
    """A smaller budget's architecture is contained in every larger one's on every axis."""

    def __post_init__(self) -> None:
        typed_blocks(self)
        self.budgets = tuple(float(b) for b in self.budgets)
        self.fractions = tuple(float(f) for f in self.fractions)
        self.axes = tuple(self.axes)
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise ConfigError(f"budgets must be fractions in (0, 1], got {list(self.budgets)}")
        if list(self.budgets) != sorted(set(self.budgets), reverse=True):
            raise ConfigError(f"budgets must be distinct and in descending order, got {list(self.budgets)}")
        if self.budget_type not in BUDGET_TYPES:
            raise ConfigError(f"budget_type {self.budget_type!r} unknown; use one of {list(BUDGET_TYPES)}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) or 1.0 not in self.fractions:
            raise ConfigError(f"fractions must lie in (0, 1] and include 1.0, got {list(self.fractions)}")
        unknown = sorted(set(self.axes) - set(ELASTIC_AXES)) + sorted(set(self.choices) - set(ELASTIC_AXES))
        if unknown:
            raise ConfigError(f"unknown elastic axis {unknown[0]!r}; axes are {list(ELASTIC_AXES)}")
        for axis, values in self.choices.items():
            if not values or any(not isinstance(v, int) or v <= 0 for v in values):
                raise ConfigError(f"choices[{axis!r}] must be a non-empty list of positive integers, got {values!r}")
        if self.multiple <= 0:
            raise ConfigError(f"multiple must be positive, got {self.multiple}")
        if self.budget_mode not in BUDGET_MODES:
            raise ConfigError(f"budget_mode {self.budget_mode!r} unknown; use one of {list(BUDGET_MODES)}")
        if not 0 < self.budget_tolerance < 0.5:
            raise ConfigError(f"budget_tolerance must be in (0, 0.5) (0.02 = ±2%), got {self.budget_tolerance}")
        if not isinstance(self.nested, bool):
            raise ConfigError(f"nested must be true or false, got {self.nested!r}")
        if self.nested and self.budget_mode == "none":
            raise ConfigError("nested budgets are chosen by projection, which budget_mode 'none' skips; "
                              "use budget_mode band or ceiling")


# Module-name patterns (fnmatch) of the linears quantized by default: the hybrid-MoE practice of
# quantizing expert, shared-expert, MLP and Mamba projections and keeping attention, the MoE
# router, conv1d, norms, embeddings and the LM head in high precision.
DEFAULT_QUANT_INCLUDE = (
    "*.mixer.in_proj", "*.mixer.out_proj", "*.mixer.up_proj", "*.mixer.down_proj",
    "*.mixer.shared_experts.up_proj", "*.mixer.shared_experts.down_proj", "*.mixer.experts",
)


@dataclasses.dataclass
class QuantConfig:
    """Quantization of an elastic checkpoint."""

    format: Literal["fp8", "nvfp4"] = "nvfp4"
    """fp8 (E4M3, per-tensor scales) or nvfp4 (E2M1, FP8 scales per 16 inputs, FP32 global scale)."""
    include: tuple[str, ...] = DEFAULT_QUANT_INCLUDE
    """fnmatch patterns of module names to quantize (`*.mixer.experts` = every routed expert)."""
    exclude: tuple[str, ...] = ()
    """Patterns removed from `include`."""
    activations: bool = True
    """Fake-quantize linear inputs with calibrated static scales (as the exported input_scale)."""

    def __post_init__(self) -> None:
        typed_blocks(self)
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        if self.format not in ("fp8", "nvfp4"):
            raise ConfigError(f"unknown quantization format {self.format!r}; use 'fp8' or 'nvfp4'")
        if not self.include:
            raise ConfigError("include must name at least one module pattern")
