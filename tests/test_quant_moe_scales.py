"""Routed-expert input scales follow what vLLM serves: one activation scale per MoE layer and
projection, the max over the experts' `input_scale`s (vLLM 0.32 `process_fp8_input_tensor_strategy_moe`).

The reference below is independent of star_elastic's quantizers: FP8 rounding by ml_dtypes, weights
dequantized from the exported bytes, the vLLM rule (max over experts) applied to the stored scales.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import tiny_elastic

from star_elastic import load_model
from star_elastic.config import QuantConfig
from star_elastic.quant.export import quant_metadata, quantized_state, write_quantized
from star_elastic.quant.fake import apply_fake_quant, set_mode

LAYER = "backbone.layers.2.mixer.experts"


def fp8_fake(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Static per-tensor FP8 E4M3 quant-dequant (saturating), rounded by ml_dtypes."""
    q = np.clip(x.double().numpy() / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return torch.from_numpy(q.astype(np.float64) * scale).float()


def reference_experts(tensors, x, weights, idx, E):
    """vLLM's FP8 MoE semantics on the exported tensors: shared input scales = max over experts."""
    def w(e, which):
        p = f"{LAYER}.{e}.{which}"
        return tensors[f"{p}.weight"].float() * tensors[f"{p}.weight_scale"].float()
    a_up = max(float(tensors[f"{LAYER}.{e}.up_proj.input_scale"]) for e in range(E))
    a_down = max(float(tensors[f"{LAYER}.{e}.down_proj.input_scale"]) for e in range(E))
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            h = torch.relu(fp8_fake(x[n : n + 1], a_up) @ w(e, "up_proj").t()) ** 2
            y[n] += (fp8_fake(h, a_down) @ w(e, "down_proj").t())[0] * weights[n, j]
    return y


@pytest.fixture(scope="module")
def calibrated():
    elastic = tiny_elastic()
    fq = copy.deepcopy(elastic.model)
    qcfg = QuantConfig(format="fp8")
    quantizers = apply_fake_quant(fq, qcfg)
    experts = fq.get_submodule(LAYER)
    seen: dict[tuple[int, str], float] = {}
    inner = experts.act_quant

    def record(x, e, which):  # every routed input, per expert: what a per-expert calibration would see
        seen[(e, which)] = max(seen.get((e, which), 0.0), float(x.abs().max()))
        return inner(x, e, which)

    experts.act_quant = record
    with torch.no_grad():
        fq(torch.randint(0, fq.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(3)))
    experts.act_quant = inner
    set_mode(quantizers, "quantize")
    return fq, qcfg, quantized_state(fq, qcfg, quantizers), seen


def test_every_expert_gets_the_layer_max_scale(calibrated):
    fq, qcfg, tensors, seen = calibrated
    E = fq.config.n_routed_experts
    for which in ("up", "down"):
        per_expert = [seen[(e, which)] for e in range(E) if (e, which) in seen]
        assert len(set(per_expert)) > 1  # per-expert calibration would have given different scales
        stored = {float(tensors[f"{LAYER}.{e}.{which}_proj.input_scale"]) for e in range(E)}
        assert len(stored) == 1 and stored.pop() == pytest.approx(max(per_expert) / 448, rel=1e-6)


def test_fake_quant_experts_equal_vllm_semantics(calibrated):
    fq, qcfg, tensors, _ = calibrated
    g = torch.Generator().manual_seed(5)
    E, k = fq.config.n_routed_experts, fq.config.num_experts_per_tok
    x = torch.randn(9, fq.config.hidden_size, generator=g) * 0.5
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(9)])
    weights = torch.rand(9, k, generator=g)
    with torch.no_grad():
        ours = fq.get_submodule(LAYER)(x, weights, idx)
    torch.testing.assert_close(ours, reference_experts(tensors, x, weights, idx, E), atol=1e-5, rtol=1e-5)


def test_loaded_checkpoint_with_per_expert_scales_uses_the_max(calibrated, tmp_path):
    """A checkpoint written elsewhere with different per-expert scales is evaluated as vLLM serves it."""
    fq, qcfg, tensors, _ = calibrated
    tensors = dict(tensors)
    E = fq.config.n_routed_experts
    for e in range(E):
        for which in ("up_proj", "down_proj"):
            key = f"{LAYER}.{e}.{which}.input_scale"
            tensors[key] = tensors[key] * (0.5 + e / E)  # expert E-1 holds the max, 1.375x
    write_quantized(tmp_path, fq.config, tensors, quant_metadata(qcfg, fq.config))
    loaded = load_model(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, fq.config.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=g)
    with torch.no_grad():
        ours = loaded.get_submodule(LAYER)(x, weights, idx)
    torch.testing.assert_close(ours, reference_experts(tensors, x, weights, idx, E), atol=1e-5, rtol=1e-5)
