"""Grouped-GEMM experts (`torch._grouped_mm`) against the per-expert loop: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny_config

from star_elastic.model.moe import MoE, grouped_mm_runs

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")


def _run(moe, x, grouped, expert_mask=None, inter_mask=None):
    moe.experts.grouped = grouped
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = moe(x, expert_mask, inter_mask)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))  # not stride-0 (see issue 11)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_equals_loop_fp32(masked):
    cfg = tiny_config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3)
    moe = randomize(MoE(cfg), seed=1, scale=0.2)
    x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(2))
    assert grouped_mm_runs(x, 16, 32)
    masks = (torch.tensor([1, 1, 1, 1, 1, 0, 0, 0.]), (torch.arange(16) < 12).float()) if masked else (None, None)
    y_g, gx_g, gp_g = _run(moe, x, True, *masks)
    y_l, gx_l, gp_l = _run(moe, x, False, *masks)
    torch.testing.assert_close(y_g, y_l, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_g, gx_l, rtol=1e-6, atol=1e-6)
    for name in gp_l:
        torch.testing.assert_close(gp_g[name], gp_l[name], rtol=1e-5, atol=1e-6, msg=name)
    assert gp_g["experts.up_proj"].abs().sum() > 0


def test_grouped_bf16_and_fallbacks():
    cfg = tiny_config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3)
    moe = randomize(MoE(cfg), seed=1, scale=0.2).to(torch.bfloat16)
    x = torch.randn(26, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        moe.experts.grouped = True
        y_g = moe(x)
        moe.experts.grouped = False
        y_l = moe(x)
    torch.testing.assert_close(y_g.float(), y_l.float(), rtol=2e-2, atol=2e-2)  # bf16 GEMMs, different kernels
    assert not grouped_mm_runs(torch.zeros(2, 3), 3, 5)  # 12-byte rows: below the 16-byte stride rule
    moe.experts.grouped = None
    moe.experts.act_quant = lambda t, e, where: t  # per-expert quantizers: the loop
    assert not moe.experts._use_grouped(x)
