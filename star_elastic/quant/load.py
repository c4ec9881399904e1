"""Reading quantized checkpoints (the layout `star_elastic.quant.export` writes; see its docstring).

`star_elastic.hf.load_model` calls these when a folder holds `hf_quant_config.json`: packed
weights are dequantized to the load dtype and the stored input scales become input quantizers, so
the loaded model computes what the fake-quantized model did.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from star_elastic.config import ConfigError
from star_elastic.model.hybrid import HybridLM
from star_elastic.quant import formats
from star_elastic.quant.fake import InputQuant, expert_input_quant

QUANT_CONFIG = "hf_quant_config.json"
EXPERT_MODULE = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)$")
"""One routed expert's linear as stored on disk: groups (the layer's experts module, expert, projection)."""


def read_quant_config(path: Path) -> dict | None:
    """hf_quant_config.json of checkpoint folder `path`, or None for an unquantized checkpoint."""
    f = path / QUANT_CONFIG
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
        algo = meta["quantization"]["quant_algo"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ConfigError(f"{f}: not a valid quantization config ({err})") from None
    if algo not in ("NVFP4", "FP8"):
        raise ConfigError(f"{f}: quant_algo {algo!r} is not supported (NVFP4 or FP8)")
    return meta


def quant_format(meta: dict) -> str:
    """`read_quant_config`'s result → the format name used everywhere else ("nvfp4" or "fp8")."""
    return "nvfp4" if meta["quantization"]["quant_algo"] == "NVFP4" else "fp8"


def dequantize_tensors(tensors: dict, meta: dict, path: Path, dtype=torch.float32) -> tuple[dict, dict]:
    """(disk key → (tensor, file)) with packed linears → dequantized weights; also input scales by module."""
    fmt = quant_format(meta)
    out, input_scales = {}, {}
    for key, (t, fname) in tensors.items():
        module, leaf = key.rsplit(".", 1)
        if leaf in ("weight_scale", "weight_scale_2"):
            continue
        if leaf == "input_scale":
            input_scales[module] = t.float()
            continue
        if leaf == "weight" and f"{module}.weight_scale" in tensors:
            s = tensors[f"{module}.weight_scale"][0]
            try:
                if fmt == "nvfp4":
                    w = formats.dequantize_nvfp4(t, s, tensors[f"{module}.weight_scale_2"][0], dtype)
                else:
                    w = formats.dequantize_fp8(t, s, dtype)
            except (KeyError, RuntimeError, ValueError) as err:
                raise ConfigError(f"{path / fname}: cannot dequantize {key!r} ({err})") from None
            out[key] = (w, fname)
        else:
            out[key] = (t.to(dtype) if t.is_floating_point() else t, fname)
    return out, input_scales


def install_input_quant(model: HybridLM, input_scales: dict[str, torch.Tensor], fmt: str) -> None:
    """Emulate the exported activation quantization with the stored input scales. Routed experts
    use the max over experts per layer and projection, as vLLM does on load (`expert_input_quant`)."""
    experts: dict[str, list[list[torch.Tensor]]] = {}
    for module, scale in input_scales.items():
        m = EXPERT_MODULE.match(module)
        if m:
            experts.setdefault(m.group(1), [[], []])[m.group(3) == "down_proj"].append(scale.reshape(()))
            continue
        q = InputQuant(fmt)
        q.set_scales(scale.reshape(1))
        model.get_submodule(module).register_forward_pre_hook(lambda mod, args, q=q: (q(args[0]),))
    for name, (up, down) in experts.items():
        shared = torch.stack([torch.stack(up).max(), torch.stack(down).max()])  # (2,): up, down
        expert_input_quant(model.get_submodule(name), fmt, shared)


__all__ = ["QUANT_CONFIG", "EXPERT_MODULE", "read_quant_config", "quant_format", "dequantize_tensors",
           "install_input_quant"]
