"""Fake quantization of a HybridLM: weights through a parametrization, inputs through hooks.

Weights: `torch.nn.utils.parametrize` replaces `linear.weight` (and each routed expert's slice of
`experts.up_proj` / `down_proj`) by dequant(quant(W)) with a straight-through gradient, so every
code path that reads the weight — masked or not — sees the quantized values. The global scale is
the whole tensor's (per expert for routed experts, which are stored per expert), so a nested
slice of the fake-quantized tensor is exactly the quantization of the slice.
Inputs: a forward pre-hook per quantized linear (and `Experts.act_quant` for experts) applies a
static calibrated scale: FP8 per tensor; NVFP4 a static global scale with dynamic 16-element
block scales. Routed experts share one input scale per MoE layer and projection, as vLLM serves
them (`expert_input_quant`). Masked inputs are zero in whole blocks, so they leave active blocks unchanged.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.utils import parametrize

from star_elastic.config import ConfigError, QuantConfig
from star_elastic.model.hybrid import HybridLM
from star_elastic.model.moe import Experts
from star_elastic.quant import formats

FP_MAX = {"fp8": formats.FP8_MAX, "nvfp4": formats.FP4_MAX * formats.FP8_MAX}


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value q, gradient of identity."""
    return x + (q - x).detach()


class WeightFakeQuant(nn.Module):
    """Parametrization: W → fake_quant(W); `per_leading` quantizes each W[e] on its own."""

    def __init__(self, fmt: str, per_leading: bool = False):
        super().__init__()
        self.fmt, self.per_leading = fmt, per_leading

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.per_leading:
            q = torch.stack([formats.fake_quantize(w[e].detach(), self.fmt) for e in range(w.shape[0])])
        else:
            q = formats.fake_quantize(w.detach(), self.fmt)
        return ste(w, q.to(w.dtype))


class InputQuant:
    """Static-scale input quantizer. mode "calibrate" records amax; "quantize" applies it."""

    def __init__(self, fmt: str, n: int = 1):
        self.fmt = fmt
        self.amax = torch.zeros(n)
        self.scales: torch.Tensor | None = None  # fixed scales (a loaded checkpoint's input_scale)
        self.mode = "calibrate"

    def set_scales(self, scales: torch.Tensor) -> None:
        self.scales, self.mode = scales.float(), "quantize"

    def scale(self, i: int = 0) -> torch.Tensor:
        """The exported input_scale: amax / 448 (fp8) or amax / (6 · 448) (nvfp4)."""
        if self.scales is not None:
            return self.scales[i]
        a = self.amax[i]
        return torch.where(a > 0, a / FP_MAX[self.fmt], torch.ones_like(a))

    def __call__(self, x: torch.Tensor, i: int = 0) -> torch.Tensor:
        if self.mode == "calibrate":
            self.amax[i] = torch.maximum(self.amax[i], x.detach().abs().amax().float().cpu())
            return x
        s = self.scale(i).to(x.device)
        if self.fmt == "fp8":
            q = formats.dequantize_fp8(formats.to_fp8(x.float() / s), s, x.dtype)
        else:
            q = formats.fake_quantize(x.float(), "nvfp4", global_scale=s).to(x.dtype)
        return ste(x, q)


def quantized_module_names(model: HybridLM, qcfg: QuantConfig) -> list[str]:
    """Names of the linears (and Experts modules) the config quantizes."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Experts)):
            continue
        if any(fnmatch.fnmatch(name, p) for p in qcfg.include) and not any(fnmatch.fnmatch(name, p) for p in qcfg.exclude):
            names.append(name)
    if not names:
        raise ConfigError(f"quantization patterns {list(qcfg.include)} match no module of this model")
    return names


def check_quantizable(model: HybridLM, names: list[str], qcfg: QuantConfig) -> None:
    if qcfg.format != "nvfp4":
        return
    for name in names:
        module = model.get_submodule(name)
        width = module.up_proj.shape[-1] if isinstance(module, Experts) else module.in_features
        inner = module.down_proj.shape[-1] if isinstance(module, Experts) else width
        if width % formats.BLOCK or inner % formats.BLOCK:
            raise ConfigError(f"{name}: input size {width} is not a multiple of {formats.BLOCK}; NVFP4 needs whole blocks")


def apply_fake_quant(model: HybridLM, qcfg: QuantConfig) -> dict[str, InputQuant]:
    """Fake-quantize `model` in place; returns the input quantizers by module name (for calibration)."""
    names = quantized_module_names(model, qcfg)
    check_quantizable(model, names, qcfg)
    quantizers: dict[str, InputQuant] = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, Experts):
            for attr in ("up_proj", "down_proj"):
                parametrize.register_parametrization(module, attr, WeightFakeQuant(qcfg.format, per_leading=True))
            if qcfg.activations:
                quantizers[name] = expert_input_quant(module, qcfg.format)
        else:
            parametrize.register_parametrization(module, "weight", WeightFakeQuant(qcfg.format))
            if qcfg.activations:
                q = InputQuant(qcfg.format)
                module.register_forward_pre_hook(lambda mod, args, q=q: (q(args[0]),))
                quantizers[name] = q
    return quantizers


def expert_input_quant(module: Experts, fmt: str, scales: torch.Tensor | None = None) -> InputQuant:
    """One input scale per MoE layer for every expert's up_proj (index 0) and one for down_proj (1).

    vLLM serves routed experts with a single activation scale per layer and projection: FP8 MoE
    takes the max of the per-expert `input_scale`s (`process_fp8_input_tensor_strategy_moe`), and
    NVFP4 MoE does the same on its FlashInfer / emulation paths. Calibrating one shared amax over
    all experts' tokens gives that max directly, and the export writes it for every expert, so
    every backend (per-expert or shared) reads the scale we evaluated with.
    """
    q = InputQuant(fmt, 2)
    if scales is not None:
        q.set_scales(scales)
    module.act_quant = lambda x, e, which: q(x, int(which == "down"))
    return q


def plain_state(state: dict) -> dict:
    """`state` (a fake-quantized model's state dict or named parameters) under the plain model's
    names: `torch.nn.utils.parametrize` keeps a parametrized tensor X as `parametrizations.X.original`
    (the master weight, unquantized); the parametrizations' own entries are dropped."""
    out = {}
    for key, t in state.items():
        if ".parametrizations." in key:
            if not key.endswith(".original"):
                continue
            key = key.replace(".parametrizations.", ".").removesuffix(".original")
        out[key] = t
    return out


def set_mode(quantizers: dict[str, InputQuant], mode: str) -> None:
    for q in quantizers.values():
        q.mode = mode
