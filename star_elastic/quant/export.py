"""Quantized checkpoints in the Hugging Face layout NVIDIA's quantized models use (and vLLM reads).

Per quantized linear `name` (experts one by one, `...experts.E.up_proj`):
  NVFP4: name.weight uint8 [out, in/2] (two E2M1 codes per byte, low nibble first),
         name.weight_scale float8_e4m3fn [out, in/16], name.weight_scale_2 fp32 [] (global),
         name.input_scale fp32 [] (activation amax / (6·448); routed experts: the layer's shared scale)
  FP8:   name.weight float8_e4m3fn [out, in], name.weight_scale fp32 [], name.input_scale fp32 []
plus `hf_quant_config.json` and a `quantization_config` block in config.json. Unquantized tensors
are stored in `high_precision_dtype` (BF16 by default), the MoE correction bias in fp32.

`slice_packed` cuts a nested slice straight from these tensors: the index sets of
`IndexSets.rule` (the same ones the masked forward and the BF16 slicer use) are mapped to bytes
(÷2) and scale blocks (÷16) along the input dimension; scalar scales are the full tensor's and
are shared by every slice. Reading these checkpoints back: `star_elastic.quant.load`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from star_elastic.config import ConfigError, ModelConfig, QuantConfig
from star_elastic.elastic.arch import Architecture, IndexSets, renumber_layer
from star_elastic.hf import WEIGHTS, atomic_save, to_disk_state, write_config, write_generation_config
from star_elastic.model.hybrid import HybridLM
from star_elastic.model.moe import Experts, keeps_fp32
from star_elastic.quant import formats
from star_elastic.quant.fake import InputQuant, plain_state, quantized_module_names
from star_elastic.quant.load import EXPERT_MODULE, QUANT_CONFIG


def _quantize_weight(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "fp8":
        q, s = formats.quantize_fp8(w)
        return {"weight": q, "weight_scale": s.reshape(())}
    packed, scales, gs = formats.quantize_nvfp4(w)
    return {"weight": packed, "weight_scale": scales, "weight_scale_2": gs.reshape(())}


def quantized_state(model: HybridLM, qcfg: QuantConfig, quantizers: dict[str, InputQuant],
                    high_precision_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """On-disk tensors of a quantized checkpoint. `model` holds the (unquantized) master weights:
    pass a model without parametrizations, or one whose parametrizations are read through
    `original` — here every weight is read raw and quantized once."""
    names = set(quantized_module_names(model, qcfg))
    raw = plain_state(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for key, t in to_disk_state(_Raw(model, raw)).items():
        module = key.rsplit(".", 1)[0]
        expert = EXPERT_MODULE.match(module)
        owner = expert.group(1) if expert else module
        if owner in names and key.endswith(".weight"):
            for suffix, value in _quantize_weight(t.float(), qcfg.format).items():
                out[f"{module}.{suffix}"] = value.contiguous()
            q = quantizers.get(owner)
            if q is not None:
                i = int(expert.group(3) == "down_proj") if expert else 0  # experts: the layer's shared scale
                out[f"{module}.input_scale"] = q.scale(i).float().reshape(())
        elif t.is_floating_point():
            out[key] = t.to(torch.float32 if keeps_fp32(key) else high_precision_dtype).contiguous()
        else:
            out[key] = t
    return out


class _Raw:
    """Duck-typed stand-in for `to_disk_state`: a model whose state dict is `state`."""

    def __init__(self, model: HybridLM, state: dict[str, torch.Tensor]):
        self.config, self._state = model.config, state

    def state_dict(self):
        return self._state


def quant_metadata(qcfg: QuantConfig, cfg: ModelConfig) -> dict:
    """hf_quant_config.json for a checkpoint of `cfg` whose modules `qcfg` quantizes.

    `exclude_modules` names every unquantized linear (and unquantized routed-expert block) one by
    one, as ModelOpt's export does. vLLM matches exclusions on its own module names: q/k/v are fused
    into `qkv_proj` and an exclusion counts only if each of `q_proj`, `k_proj`, `v_proj` is listed
    exactly, so a layer-wildcard such as `backbone.layers.*.mixer.q_proj` never matches (the
    fused module would be built FP8/NVFP4 and loaded from BF16 weights). Names follow `cfg`'s
    layer numbering: call this with the config of the checkpoint being written (a depth slice's
    renumbered config included).
    """
    with torch.device("meta"):  # module names only: no memory, no init
        skeleton = HybridLM(cfg)
    names = set(quantized_module_names(skeleton, qcfg))
    excluded = sorted(n for n, m in skeleton.named_modules() if isinstance(m, (torch.nn.Linear, Experts)) and n not in names)
    algo = "NVFP4" if qcfg.format == "nvfp4" else "FP8"
    return {
        "producer": {"name": "star-elastic", "version": "0.1.0"},
        "quantization": {
            "quant_algo": algo,
            "kv_cache_quant_algo": None,
            "group_size": formats.BLOCK if algo == "NVFP4" else None,
            "exclude_modules": excluded,
        },
    }


def write_quantized(path: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], meta: dict, tokenizer=None) -> None:
    """config.json (with quantization_config), hf_quant_config.json, model.safetensors,
    generation_config.json, tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    atomic_save(tensors, path / WEIGHTS)
    write_quant_configs(path, cfg, meta)
    write_generation_config(cfg, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def write_quant_configs(path: Path, cfg: ModelConfig, meta: dict) -> None:
    """config.json with its `quantization_config` block, and hf_quant_config.json."""
    q = meta["quantization"]
    write_config(cfg, path, torch.bfloat16, extra={"quantization_config": {
        "quant_method": "modelopt", "quant_algo": q["quant_algo"], "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
        "group_size": q.get("group_size"), "exclude_modules": q["exclude_modules"],
        "ignore": q["exclude_modules"],  # vLLM reads `ignore` when it takes config.json's block
    }})
    (path / QUANT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


# --- slicing packed tensors ---------------------------------------------------------------------
def _to_units(idx: torch.Tensor, factor: int, what: str) -> torch.Tensor:
    """Channel indices → indices of `factor`-wide units (bytes, blocks); runs must be whole units."""
    if idx.numel() % factor:
        raise ConfigError(f"{what}: {idx.numel()} kept input channels do not fill whole units of {factor}")
    groups = idx.view(-1, factor)
    if not torch.equal(groups - groups[:, :1], torch.arange(factor).expand_as(groups)) or bool((groups[:, 0] % factor).any()):
        raise ConfigError(f"{what}: kept input channels are not aligned to units of {factor}")
    return groups[:, 0] // factor


class TensorSlicer:
    """Slices on-disk tensors one at a time: BF16 / FP32, or packed FP8 / NVFP4 (never dequantized).

    `keys` are every on-disk key of the checkpoint (it tells which linears are packed: those with a
    `weight_scale`). A packed weight and its scales follow its weight's `IndexSets.rule`; the input
    dim is mapped to bytes (NVFP4, 2 per byte) and scale blocks (16 per FP8 scale); scalar scales
    are the full tensor's and are kept as they are.
    """

    SCALES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale")  # k/v: ModelOpt FP8 KV cache

    def __init__(self, cfg: ModelConfig, arch: Architecture, keys, fmt: str | None):
        self.sets, self.keys, self.fmt = IndexSets.prefix(cfg, arch), set(keys), fmt
        self.new_layer = {old: new for new, old in enumerate(arch.layers)}
        self.kept_experts = {int(e): new for new, e in enumerate(self.sets.experts.tolist())}

    def __call__(self, key: str, t: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """(sliced key, sliced tensor), or None for a dropped expert or layer."""
        module, leaf = key.rsplit(".", 1)
        packed = leaf in self.SCALES or (leaf == "weight" and f"{module}.weight_scale" in self.keys)
        expert = EXPERT_MODULE.match(module)
        if expert:  # one expert's 2D tensor: the stacked (E, out, in) rule without its expert dim
            e = int(expert.group(2))
            if e not in self.kept_experts:
                return None
            rule = {d - 1: idx for d, idx in self.sets.rule(f"{expert.group(1)}.{expert.group(3)}").items() if d > 0}
            module = f"{expert.group(1)}.{self.kept_experts[e]}.{expert.group(3)}"
        else:
            rule = self.sets.rule(f"{module}.weight" if packed else key)
        new_module = renumber_layer(module, self.new_layer)
        if new_module is None:
            return None
        if t.dim() == 0:
            return f"{new_module}.{leaf}", t
        if packed and 1 in rule and (leaf == "weight_scale" or (leaf == "weight" and self.fmt == "nvfp4")):
            factor = formats.BLOCK if leaf == "weight_scale" else 2
            rule = rule | {1: _to_units(rule[1], factor, f"{key} (input dim)")}
        return f"{new_module}.{leaf}", _gather_any(t, rule)


def slice_packed(tensors: dict[str, torch.Tensor], cfg: ModelConfig, arch: Architecture, fmt: str) -> dict[str, torch.Tensor]:
    """Slice a quantized checkpoint's tensors to `arch` without dequantizing."""
    slicer = TensorSlicer(cfg, arch, tensors, fmt)
    return dict(filter(None, (slicer(key, t) for key, t in tensors.items())))


def _gather_any(t: torch.Tensor, rule: dict[int, torch.Tensor]) -> torch.Tensor:
    """index_select for any dtype (uint8, float8) via a byte view where needed."""
    view_u8 = t.dtype == torch.float8_e4m3fn
    x = t.view(torch.uint8) if view_u8 else t
    for dim, idx in sorted(rule.items()):
        x = x.index_select(dim, idx)
    x = x.contiguous()
    return x.view(torch.float8_e4m3fn) if view_u8 else x


__all__ = ["quantized_state", "quant_metadata", "write_quantized", "write_quant_configs", "slice_packed", "TensorSlicer"]
