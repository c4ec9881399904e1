"""FP8 (E4M3) and NVFP4 (E2M1 + FP8 block scales) quantization: pure tensor functions.

NVFP4, as NVIDIA's checkpoints store it (PAPER.md, "Quantization formats"):
  global scale   gs = amax(|W|) / (6 · 448)                       one fp32 per tensor
  block scale    s  = fp8_e4m3(block_amax / (6 · gs)), ≥ 2⁻⁹;     one per 16 inputs; zero block → 1
  value          q  = e2m1(x / (s · gs))   round to nearest even, saturating at ±6
  packing        two 4-bit codes per byte, the even-indexed element in the low nibble
FP8: per-tensor scale amax / 448, values cast to float8_e4m3fn (round to nearest even).
Block scales depend only on their own 16-element block and the tensor's global scale, so slicing
whole blocks of a quantized tensor gives exactly the quantization of the sliced tensor under the
same global scale: that is what keeps every nested slice usable.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
BLOCK = 16
MIN_BLOCK_SCALE = 2.0**-9  # smallest positive (subnormal) E4M3 value
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2  # decision boundaries


# --- FP8 ------------------------------------------------------------------------------------------
def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to float8_e4m3fn, saturating at ±448 (a bare cast would give NaN above it)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale amax / 448 (1 for an all-zero tensor), fp32 scalar."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x → (float8_e4m3fn values, fp32 scale) with x ≈ values · scale."""
    scale = fp8_scale(x.detach().abs().amax()) if scale is None else scale.float()
    return to_fp8(x.float() / scale), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


# --- E2M1 -----------------------------------------------------------------------------------------
def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """fp32 → 4-bit E2M1 codes (uint8, sign in bit 3), round to nearest even, saturating at ±6."""
    a = x.float().abs().clamp(max=FP4_MAX)
    mids = _E2M1_MIDPOINTS.to(x.device)
    code = torch.bucketize(a, mids)  # mids[code-1] < a <= mids[code]: a tie goes to the lower code
    tie = (code < len(mids)) & (a == mids[code.clamp(max=len(mids) - 1)])
    code = code + (tie & (code % 2 == 1)).long()  # at a tie prefer the even code (even mantissa)
    sign = (x < 0) & (code > 0)  # -0 is stored as +0
    return (code | (sign.long() << 3)).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes → fp32 values."""
    mag = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) codes, n even → (..., n/2) bytes; element 2i in the low nibble, 2i+1 in the high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of FP4 values ({codes.shape[-1]})")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n/2) bytes → (..., n) codes."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# --- NVFP4 ----------------------------------------------------------------------------------------
def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """gs = amax / (6 · 448) as fp32 (1 for an all-zero tensor)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / (FP4_MAX * FP8_MAX), torch.ones_like(amax))


def nvfp4_block_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """(..., n) → (..., n/16) float8_e4m3fn block scales."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension to be a multiple of {BLOCK}, got {x.shape[-1]}")
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    block_amax = blocks.abs().amax(-1)
    s = to_fp8(block_amax / (FP4_MAX * global_scale.float())).float().clamp(min=MIN_BLOCK_SCALE)
    s = torch.where(block_amax > 0, s, torch.ones_like(s))
    return s.to(torch.float8_e4m3fn)


def quantize_nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., n) → (packed uint8 (..., n/2), block scales fp8 (..., n/16), global scale fp32)."""
    gs = nvfp4_global_scale(x.detach().abs().amax()) if global_scale is None else global_scale.float()
    scales = nvfp4_block_scales(x, gs)
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    codes = e2m1_codes(blocks / (scales.float().unsqueeze(-1) * gs)).reshape(x.shape)
    return pack_fp4(codes), scales, gs


def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                     dtype=torch.float32) -> torch.Tensor:
    codes = unpack_fp4(packed)
    values = e2m1_values(codes).reshape(*codes.shape[:-1], -1, BLOCK)
    return (values * scales.float().unsqueeze(-1) * global_scale.float()).reshape(codes.shape).to(dtype)


def fake_quantize(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (same dtype as x); the `global_scale`/FP8 scale may be given."""
    if fmt == "fp8":
        q, s = quantize_fp8(x, global_scale)
        return dequantize_fp8(q, s, x.dtype)
    if fmt == "nvfp4":
        return dequantize_nvfp4(*quantize_nvfp4(x, global_scale), dtype=x.dtype)
    raise ValueError(f"unknown quantization format {fmt!r}; use 'fp8' or 'nvfp4'")
