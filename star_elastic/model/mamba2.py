"""Mamba-2 mixer of Nemotron-H: fused in_proj, depthwise causal conv1d, SSD scan, gated norm.

Differences from the textbook Mamba-2 block worth knowing:
- in_proj emits [z | x | B | C | dt] in that order; conv1d runs over [x | B | C] only.
- B and C are shared by the heads of one SSM group (`n_groups`), and the gated RMSNorm
  normalises each group separately; both matter for group-aware head pruning.
- dt = softplus(dt + dt_bias) is clamped to `time_step_limit` (default (0, inf): no clamp), in the
  scan and in the decode step, as vLLM, mamba_ssm and transformers' cached decode do. transformers'
  full forward before 5.25 clamps at `time_step_min` instead; the two differ only where softplus <
  time_step_min.
The scan runs in fp32 whatever the weights' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from star_elastic.config import ModelConfig
from star_elastic.model.norm import GatedRMSNorm


class MambaState:
    """Recurrent state of one Mamba-2 layer: conv window (B, K-1, conv_dim), SSM state (B, H, P, N)."""

    def __init__(self) -> None:
        self.conv: torch.Tensor | None = None
        self.ssm: torch.Tensor | None = None


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of a (b, T, ...) tensor at the end."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t


# Decays are exp(x) with x <= 0. torch's CPU exp leaves its vectorised path for -inf (about 30x
# slower per element) and for arguments whose result underflows (x < -87.34 in fp32: 100-300x),
# which strong decays (A·dt summed over a chunk) can reach. So the acausal half of a decay matrix
# is multiplied by 0 instead of being exp(-inf), and arguments are floored at LOG_TINY, where exp
# is still a normal float (1.6e-38 instead of 0 or a denormal: no visible change to a sum that
# also holds a term of order 1). benchmarks/bench_mamba_decay.py: prefill 0.8x, training 0.9x.
LOG_TINY = -87.0


class _FlooredExp(torch.autograd.Function):
    """exp(x.clamp(LOG_TINY, 0)) * mask whose backward, like exp's, needs only its output: a
    clamp in the graph would also keep its (..., L, L) input for the backward."""

    @staticmethod
    def forward(ctx, x, mask):
        out = _floored_exp(x, mask)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * out, None  # d exp(x) = exp(x); 0 where masked; ~0 below the floor, as exp's


def _floored_exp(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = torch.exp(x.clamp(LOG_TINY, 0.0))
    return out if mask is None else out.mul_(mask)


def _exp_decay(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """exp(x) for x <= 0, floored at exp(LOG_TINY) (see above), times an optional 0/1 mask."""
    if x.requires_grad and torch.is_grad_enabled():
        return _FlooredExp.apply(x, mask)
    return _floored_exp(x, mask)


def _decay_matrix(a_cum: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """exp(a_cum[..., l] - a_cum[..., s]) for s <= l, else 0: shape (..., L, L).

    a_cum holds inclusive cumulative log-decays (non-increasing) along the last axis, so the entry
    is the decay from step s to step l, and the differences at s > l (>= 0) are not used.
    `same` (..., L, L) 0/1, broadcastable: 1 where l and s are of one document; the others are 0.
    """
    n = a_cum.shape[-1]
    diff = a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)  # (..., l, s)
    causal = torch.ones(n, n, dtype=a_cum.dtype, device=a_cum.device).tril()
    return _exp_decay(diff, causal if same is None else causal * same)


def _document_masks(seq_idx: torch.Tensor, pad: int, chunk: int, dtype: torch.dtype):
    """0/1 masks (dtype) that keep the scan's terms within one document, for ssd_chunked.

    seq_idx (b, T) non-decreasing document index of each step; padded steps join the last document.
    Returns, shaped to broadcast against the scan's (b, c, G, R, ...) tensors:
    within (b, c, 1, 1, Q, Q): steps l, s of a chunk in one document;
    to_end (b, c, 1, 1, Q): step s in the document of its chunk's last step;
    from_start (b, c, 1, 1, Q): step l in the document of the state entering its chunk;
    carry (b, 1, 1, c+1, c+1): states k, j (entering chunk k / j; the last: leaving the sequence) in
    one document. As indices never decrease, equal ends mean every step between is that document's.
    """
    b = seq_idx.shape[0]
    s = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1).view(b, -1, chunk)  # (b, c, Q)
    ends = torch.cat([s[:, :1, 0], s[:, :, -1]], dim=1)  # (b, c+1): document of each state; init is the first's
    within = s.unsqueeze(-1) == s.unsqueeze(-2)
    to_end = s == s[..., -1:]
    from_start = s == ends[:, :-1, None]
    carry = ends.unsqueeze(-1) == ends.unsqueeze(-2)
    return (within[:, :, None, None].to(dtype), to_end[:, :, None, None].to(dtype),
            from_start[:, :, None, None].to(dtype), carry[:, None, None].to(dtype))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    chunk: int,
    init: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked state-space-duality scan (Mamba-2), any length T.

    x (b, T, H, P), dt (b, T, H) already softplus'ed, A (H,) negative, Bm/Cm (b, T, G, N),
    init (b, H, P, N) or None. Returns y (b, T, H, P) without the D skip, final state (b, H, P, N).
    seq_idx (b, T), non-decreasing: the document of each step in a packed row. Each document then
    starts from a zero state (init, if given, is the first document's) and the returned state is
    the last document's; every term across documents is multiplied by an exact 0. None: one document.
    Within a chunk the quadratic (attention-like) form is used; chunk states are then carried
    across chunks with one small matrix of decays instead of a Python loop. Work happens in a
    head-major layout (b, c, G, R, Q, ...) so every contraction is a batched matmul.
    """
    b, T, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    R = H // G
    pad = (-T) % chunk
    # zero dt on padded steps: decay exp(0) = 1 and no input, so the final state is unaffected
    x, dt, Bm, Cm = (_pad_time(t, pad) for t in (x, dt, Bm, Cm))
    c = (T + pad) // chunk
    xdt = (x * dt.unsqueeze(-1)).view(b, c, chunk, G, R, P).permute(0, 1, 3, 4, 2, 5)  # (b, c, G, R, Q, P)
    a_cum = torch.cumsum((dt * A).view(b, c, chunk, G, R).permute(0, 1, 3, 4, 2), dim=-1)  # (b, c, G, R, Q)
    Bm = Bm.view(b, c, chunk, G, N).transpose(2, 3).unsqueeze(3)  # (b, c, G, 1, Q, N)
    Cm = Cm.view(b, c, chunk, G, N).transpose(2, 3).unsqueeze(3)
    within, to_end_mask, from_start, carry_mask = (
        (None,) * 4 if seq_idx is None else _document_masks(seq_idx, pad, chunk, x.dtype)
    )

    # 1. outputs from inputs of the same chunk: y[l] = sum_s (C[l]·B[s]) decay(s→l) dt[s] x[s]
    weights = _decay_matrix(a_cum, within)  # (b, c, G, R, Q, Q)
    weights = weights * (Cm @ Bm.transpose(-1, -2))  # C·B shared by the R heads of a group
    y = weights @ xdt  # (b, c, G, R, Q, P)

    # 2. each chunk's own contribution to the state at its end: (b, c, G, R, P, N)
    to_end = _exp_decay(a_cum[..., -1:] - a_cum, to_end_mask).unsqueeze(-1)  # (b, c, G, R, Q, 1)
    chunk_states = (xdt * to_end).transpose(-1, -2) @ Bm

    # 3. states entering each chunk: S_k = sum_{j<=k} exp(sum of chunk decays j..k-1) * in_j
    if init is None:
        init = x.new_zeros(b, H, P, N)
    inputs = torch.cat([init.view(b, 1, G, R, P, N).to(x.dtype), chunk_states], dim=1)  # (b, c+1, G, R, P, N)
    totals = F.pad(a_cum[..., -1], (0, 0, 0, 0, 1, 0))  # (b, c+1, G, R), leading zero
    carry = _decay_matrix(torch.cumsum(totals, dim=1).permute(0, 2, 3, 1), carry_mask)  # (b, G, R, c+1, c+1)
    states = torch.einsum("bgrkj,bjgrpn->bkgrpn", carry, inputs)  # (b, c+1, G, R, P, N)

    # 4. outputs from the state entering the chunk, decayed to each step
    y = y + (Cm @ states[:, :c].transpose(-1, -2)) * _exp_decay(a_cum, from_start).unsqueeze(-1)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * chunk, H, P)[:, :T]
    return y, states[:, c].reshape(b, H, P, N)


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor
) -> torch.Tensor:
    """One recurrent step, updating `state` (b, H, P, N) in place.

    x (b, H, P), dt (b, H), Bm/Cm (b, G, N). Returns y (b, H, P) without the D skip.
    """
    b, H, P = x.shape
    G = Bm.shape[1]
    Bh = Bm.repeat_interleave(H // G, dim=1).unsqueeze(2)  # (b, H, 1, N)
    Ch = Cm.repeat_interleave(H // G, dim=1).unsqueeze(2)
    # elementwise rather than (b)mm: with an output width of 1, bmm costs ~10x more on CPU here
    state.mul_(_exp_decay(dt * A)[..., None, None]).addcmul_((dt.unsqueeze(-1) * x).unsqueeze(-1), Bh)
    return (state * Ch).sum(-1)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.mamba_num_heads, cfg.mamba_head_dim
        self.n_groups, self.state_size = cfg.n_groups, cfg.ssm_state_size
        self.inner, self.conv_dim = cfg.mamba_inner, cfg.mamba_conv_dim
        self.chunk_size, self.dt_limit = cfg.chunk_size, cfg.time_step_limit
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

    def _conv(self, xbc: torch.Tensor, state: MambaState | None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Causal depthwise conv + SiLU over time. xbc (B, T, conv_dim) → (B, T, conv_dim).

        Written as K shifted multiply-adds: for a 4-tap depthwise filter this is several times
        faster on CPU than a grouped conv1d call, and identical in value. With seq_idx (B, T) a tap
        that would read a step of another document reads zero, as at the start of a sequence.
        """
        B, T, C = xbc.shape
        w = self.conv1d.weight.view(C, -1).t()  # (K, C)
        K = w.shape[0]
        if state is None:
            window = F.pad(xbc, (0, 0, K - 1, 0))  # (B, K-1+T, C)
        else:
            if state.conv is None:
                state.conv = xbc.new_zeros(B, K - 1, C)
            window = torch.cat([state.conv, xbc], dim=1)
            # a copy after a prefill: a view would keep the whole (B, K-1+T, C) window alive
            state.conv = window[:, -(K - 1) :] if T == 1 else window[:, -(K - 1) :].contiguous()
        same = None
        if seq_idx is not None:  # (B, K, T, 1): 1 where tap k of step t reads a step of t's document
            docs = F.pad(seq_idx, (K - 1, 0), value=-1).unfold(1, T, 1)  # (B, K, T)
            same = (docs == seq_idx.unsqueeze(1)).unsqueeze(-1).to(xbc.dtype)

        def tap(k: int) -> torch.Tensor:  # (B, T, C): the window's step t-(K-1)+k for each step t
            part = window[:, k : k + T]
            return part if same is None else part * same[:, k]

        y = tap(0) * w[0]
        for k in range(1, K):
            y.addcmul_(tap(k), w[k])  # in place: autograd needs only the factors
        if self.conv1d.bias is not None:
            y.add_(self.conv1d.bias)
        return F.silu(y)

    def forward(
        self,
        hidden: torch.Tensor,
        state: MambaState | None = None,
        pad_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (B, T, C); pad_mask (B, T) 1 for real tokens; head_mask (H,) active heads;
        seq_idx (B, T) document of each token of a packed row (no state then), None: one document."""
        B, T, _ = hidden.shape
        dtype = hidden.dtype
        if pad_mask is not None:  # padded steps must feed nothing into the conv window or state
            hidden = hidden * pad_mask.unsqueeze(-1).to(dtype)
        z, xbc, dt = self.in_proj(hidden).split([self.inner, self.conv_dim, self.num_heads], dim=-1)
        xbc = self._conv(xbc, state, seq_idx)
        if pad_mask is not None:
            xbc = xbc * pad_mask.unsqueeze(-1).to(dtype)
        gn = self.n_groups * self.state_size
        x, Bm, Cm = xbc.float().split([self.inner, gn, gn], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)  # (B, T, H)
        A = -torch.exp(self.A_log.float())
        x = x.view(B, T, self.num_heads, self.head_dim)
        Bm = Bm.reshape(B, T, self.n_groups, self.state_size)
        Cm = Cm.reshape(B, T, self.n_groups, self.state_size)
        if state is not None and state.ssm is not None and T == 1:
            y = ssd_step(state.ssm, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0]).unsqueeze(1)
        else:
            init = None if state is None else state.ssm
            y, final = ssd_chunked(x, dt, A, Bm, Cm, self.chunk_size, init, seq_idx)
            if state is not None:  # a copy: `final` is a view of every chunk's state (b, c+1, H, P, N)
                state.ssm = final.contiguous()
        y = y + x * self.D.float().view(-1, 1)  # (B, T, H, P)
        inner_mask = None if head_mask is None else head_mask.repeat_interleave(self.head_dim)
        y = self.norm(y.reshape(B, T, self.inner), z, inner_mask)
        return self.out_proj(y.to(dtype))
