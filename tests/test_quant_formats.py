"""FP8 / NVFP4 primitives bit-exact against ml_dtypes, an independent implementation of the formats."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from star_elastic.quant.formats import (
    BLOCK, dequantize_nvfp4, e2m1_codes, e2m1_values, fake_quantize, nvfp4_global_scale, pack_fp4, quantize_fp8,
    quantize_nvfp4, to_fp8, unpack_fp4,
)


def oracle_fp4(x: np.ndarray) -> np.ndarray:
    """ml_dtypes' E2M1 cast (round to nearest even), saturated to ±6 first."""
    return np.clip(x, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)


def oracle_fp8(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def test_e2m1_matches_ml_dtypes_on_grid_ties_and_random():
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    ties = (grid[1:] + grid[:-1]) / 2  # every midpoint: round half to even
    rng = np.random.default_rng(0)
    x = np.concatenate([grid, -grid, ties, -ties, rng.normal(0, 3, 5000).astype(np.float32), [7.5, -100, 6.01]])
    ours = e2m1_values(e2m1_codes(torch.from_numpy(x))).numpy()
    np.testing.assert_array_equal(ours, oracle_fp4(x))
    # the midpoints, spelled out: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4
    assert ours[16:23].tolist() == [0, 1, 1, 2, 2, 4, 4]


def test_fp4_bit_pattern_equals_ml_dtypes_encoding():
    x = np.array([0.5, -0.5, 6, -6, 1.5, -3, 0, 4], dtype=np.float32)
    ours = e2m1_codes(torch.from_numpy(x)).numpy()
    theirs = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F
    np.testing.assert_array_equal(ours, theirs)


def test_fp8_matches_ml_dtypes_including_saturation():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 50, 5000), [448, 449, 1000, -1e6, 2.0**-9, 2.0**-10, 0.0]]).astype(np.float32)
    np.testing.assert_array_equal(to_fp8(torch.from_numpy(x)).float().numpy(), oracle_fp8(x))


def test_pack_low_nibble_first_and_round_trip():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(unpack_fp4(packed), codes)


def nvfp4_oracle(w: np.ndarray):
    """NVFP4 written out with numpy + ml_dtypes only."""
    gs = np.float32(np.abs(w).max() / (6 * 448))
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    bmax = np.abs(blocks).max(-1)
    s = oracle_fp8((bmax / (6 * gs)).astype(np.float32))
    s = np.where(bmax > 0, np.maximum(s, 2.0**-9), 1.0).astype(np.float32)
    q = oracle_fp4((blocks / (s[..., None] * gs)).astype(np.float32))
    return (q * s[..., None] * gs).reshape(w.shape), s, gs


def test_nvfp4_quantization_matches_oracle_with_outliers_and_zero_blocks():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.02, (24, 64)).astype(np.float32)
    w[3, 5] = 1.7  # an outlier sets the global scale
    w[7, 16:32] = 0  # an all-zero block
    w[9, :16] = 1e-9  # a tiny block: scale clamps at 2^-9
    packed, scales, gs = quantize_nvfp4(torch.from_numpy(w))
    ref, ref_s, ref_gs = nvfp4_oracle(w)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 32)
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (24, 4)
    assert float(gs) == pytest.approx(float(ref_gs), rel=0)
    np.testing.assert_array_equal(scales.float().numpy(), ref_s)
    np.testing.assert_array_equal(dequantize_nvfp4(packed, scales, gs).numpy(), ref)
    assert scales[7, 1].float() == 1.0 and scales[9, 0].float() == 2.0**-9


def test_slice_then_quantize_equals_quantize_then_slice():
    """Whole 16-blocks of rows and leading columns, under the full tensor's global scale."""
    w = torch.randn(32, 96)
    packed, scales, gs = quantize_nvfp4(w)
    rows, cols = torch.tensor([0, 3, 4, 5, 17, 30]), 48
    p2, s2, _ = quantize_nvfp4(w[rows, :cols], global_scale=gs)
    assert torch.equal(packed[rows, : cols // 2], p2)
    assert torch.equal(scales[rows, : cols // BLOCK].view(torch.uint8), s2.view(torch.uint8))


def test_fp8_and_nvfp4_error_levels():
    w = torch.randn(64, 128)
    for fmt, min_sqnr in (("fp8", 28.0), ("nvfp4", 17.0)):
        err = w - fake_quantize(w, fmt)
        sqnr = 10 * torch.log10(w.pow(2).mean() / err.pow(2).mean())
        assert sqnr > min_sqnr, (fmt, float(sqnr))
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and float(s) == pytest.approx(float(w.abs().max()) / 448)
    with pytest.raises(ValueError, match="unknown quantization format 'int4'"):
        fake_quantize(w, "int4")
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.randn(4, 20))
    assert float(nvfp4_global_scale(torch.tensor(0.0))) == 1.0
