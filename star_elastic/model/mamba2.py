"""Mamba-2 mixer of Nemotron-H: fused in_proj, depthwise causal conv1d, SSD scan, gated norm.

Differences from the textbook Mamba-2 block worth knowing:
- in_proj emits [z | x | B | C | dt] in that order; conv1d runs over [x | B | C] only.
- B and C are shared by the heads of one SSM group (`n_groups`), and the gated RMSNorm
  normalises each group separately; both matter for group-aware head pruning.
- dt = softplus(dt + dt_bias) is clamped below at `time_step_min`, as transformers' mixer does.
The scan runs in fp32 whatever the weights' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from star_elastic.config import ModelConfig
from star_elastic.model.norm import GatedRMSNorm


class MambaState:
    """Recurrent state of one Mamba-2 layer: conv window (B, conv_dim, K-1), SSM state (B, H, P, N)."""

    def __init__(self) -> None:
        self.conv: torch.Tensor | None = None
        self.ssm: torch.Tensor | None = None


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of a (b, T, ...) tensor at the end."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t


def _decay_matrix(a_cum: torch.Tensor, dim: int) -> torch.Tensor:
    """exp(a_cum[l] - a_cum[s]) for s <= l, else 0, with l, s along `dim`; new axis after `dim`.

    a_cum holds inclusive cumulative log-decays, so the entry is the decay from step s to step l.
    """
    diff = a_cum.unsqueeze(dim + 1) - a_cum.unsqueeze(dim)  # [..., l, s, ...]
    n = a_cum.shape[dim]
    causal = torch.ones(n, n, dtype=torch.bool, device=a_cum.device).tril()
    causal = causal.view(n, n, *([1] * (a_cum.dim() - dim - 1)))
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    chunk: int,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked state-space-duality scan (Mamba-2), any length T.

    x (b, T, H, P), dt (b, T, H) already softplus'ed, A (H,) negative, Bm/Cm (b, T, G, N),
    init (b, H, P, N) or None. Returns y (b, T, H, P) without the D skip, final state (b, H, P, N).
    Within a chunk the quadratic (attention-like) form is used; chunk states are then carried
    across chunks with one small matrix of decays instead of a Python loop.
    """
    b, T, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    R = H // G
    pad = (-T) % chunk
    # zero dt on padded steps: decay exp(0) = 1 and no input, so the final state is unaffected
    x, dt, Bm, Cm = (_pad_time(t, pad) for t in (x, dt, Bm, Cm))
    c = (T + pad) // chunk
    x = x.view(b, c, chunk, G, R, P)
    dt = dt.view(b, c, chunk, G, R)
    Bm = Bm.view(b, c, chunk, G, N)
    Cm = Cm.view(b, c, chunk, G, N)

    a_cum = torch.cumsum(dt * A.view(G, R), dim=2)  # (b, c, Q, G, R) log-decay since chunk start
    xdt = x * dt.unsqueeze(-1)  # (b, c, Q, G, R, P)

    # 1. outputs from inputs of the same chunk: y[l] = sum_s (C[l]·B[s]) decay(s→l) dt[s] x[s]
    scores = torch.einsum("bclgn,bcsgn->bclsg", Cm, Bm)  # (b, c, Q, Q, G)
    weights = scores.unsqueeze(-1) * _decay_matrix(a_cum, dim=2)  # (b, c, Q, Q, G, R)
    y = torch.einsum("bclsgr,bcsgrp->bclgrp", weights, xdt)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[:, :, -1:] - a_cum)  # (b, c, Q, G, R)
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bm, xdt * to_end.unsqueeze(-1))

    # 3. states entering each chunk: S_k = sum_{j<=k} exp(sum of chunk decays j..k-1) * in_j
    if init is None:
        init = x.new_zeros(b, H, P, N)
    inputs = torch.cat([init.view(b, 1, G, R, P, N).to(x.dtype), chunk_states], dim=1)  # (b, c+1, ...)
    totals = F.pad(a_cum[:, :, -1], (0, 0, 0, 0, 1, 0))  # (b, c+1, G, R), leading zero
    carry = _decay_matrix(torch.cumsum(totals, dim=1), dim=1)  # (b, c+1, c+1, G, R)
    states = torch.einsum("bkjgr,bjgrpn->bkgrpn", carry, inputs)  # (b, c+1, G, R, P, N)

    # 4. outputs from the state entering the chunk
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", Cm, states[:, :c]) * torch.exp(a_cum).unsqueeze(-1)
    y = y.reshape(b, c * chunk, H, P)[:, :T]
    return y, states[:, c].reshape(b, H, P, N)


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor
) -> torch.Tensor:
    """One recurrent step, updating `state` (b, H, P, N) in place.

    x (b, H, P), dt (b, H), Bm/Cm (b, G, N). Returns y (b, H, P) without the D skip.
    """
    b, H, P = x.shape
    G = Bm.shape[1]
    Bh = Bm.repeat_interleave(H // G, dim=1)  # (b, H, N)
    Ch = Cm.repeat_interleave(H // G, dim=1)
    decay = torch.exp(dt * A)[..., None, None]  # (b, H, 1, 1)
    state.mul_(decay).add_((dt[..., None] * x).unsqueeze(-1) * Bh.unsqueeze(2))
    return torch.einsum("bhpn,bhn->bhp", state, Ch)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.mamba_num_heads, cfg.mamba_head_dim
        self.n_groups, self.state_size = cfg.n_groups, cfg.ssm_state_size
        self.inner, self.conv_dim = cfg.mamba_inner, cfg.mamba_conv_dim
        self.chunk_size, self.dt_min = cfg.chunk_size, cfg.time_step_min
        self.in_proj = nn.Linear(cfg.hidden_size, self.inner + self.conv_dim + self.num_heads, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim,
            padding=cfg.conv_kernel - 1, bias=cfg.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.inner, self.n_groups, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.inner, cfg.hidden_size, bias=cfg.mamba_proj_bias)

    def _conv(self, xbc: torch.Tensor, state: MambaState | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU over time. xbc (B, T, conv_dim)."""
        T = xbc.shape[1]
        xt = xbc.transpose(1, 2)  # (B, conv_dim, T)
        w, bias = self.conv1d.weight, self.conv1d.bias  # (conv_dim, 1, K)
        if state is None:
            y = F.conv1d(xt, w, bias, padding=w.shape[-1] - 1, groups=self.conv_dim)[..., :T]
        else:
            if state.conv is None:
                state.conv = xt.new_zeros(xt.shape[0], self.conv_dim, w.shape[-1] - 1)
            window = torch.cat([state.conv, xt], dim=-1)  # (B, conv_dim, K-1+T)
            state.conv = window[..., -(w.shape[-1] - 1) :]
            y = F.conv1d(window, w, bias, groups=self.conv_dim)
        return F.silu(y).transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        state: MambaState | None = None,
        pad_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (B, T, C); pad_mask (B, T) 1 for real tokens; head_mask (H,) active heads."""
        B, T, _ = hidden.shape
        dtype = hidden.dtype
        if pad_mask is not None:  # padded steps must feed nothing into the conv window or state
            hidden = hidden * pad_mask.unsqueeze(-1).to(dtype)
        z, xbc, dt = self.in_proj(hidden).split([self.inner, self.conv_dim, self.num_heads], dim=-1)
        xbc = self._conv(xbc, state)
        if pad_mask is not None:
            xbc = xbc * pad_mask.unsqueeze(-1).to(dtype)
        gn = self.n_groups * self.state_size
        x, Bm, Cm = xbc.float().split([self.inner, gn, gn], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp_min(self.dt_min)  # (B, T, H)
        A = -torch.exp(self.A_log.float())
        x = x.view(B, T, self.num_heads, self.head_dim)
        Bm = Bm.reshape(B, T, self.n_groups, self.state_size)
        Cm = Cm.reshape(B, T, self.n_groups, self.state_size)
        if state is not None and state.ssm is not None and T == 1:
            y = ssd_step(state.ssm, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0]).unsqueeze(1)
        else:
            init = None if state is None else state.ssm
            y, final = ssd_chunked(x, dt, A, Bm, Cm, self.chunk_size, init)
            if state is not None:
                state.ssm = final
        y = y + x * self.D.float().view(-1, 1)  # (B, T, H, P)
        inner_mask = None if head_mask is None else head_mask.repeat_interleave(self.head_dim)
        y = self.norm(y.reshape(B, T, self.inner), z, inner_mask)
        return self.out_proj(y.to(dtype))
