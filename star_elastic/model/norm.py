"""RMSNorm and the grouped, gated RMSNorm of the Mamba-2 mixer.

Both accept an optional channel mask. With a 0/1 mask the statistics are taken over the active
channels only and inactive channels come out as zero, which is exactly what the physically
sliced (narrower) norm computes. With a soft mask (router training) the same formula interpolates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_rms(x: torch.Tensor, mask: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rsqrt(mean of x² over active channels + eps), in x's dtype (callers pass fp32)."""
    if mask is None:
        return F.rms_norm(x, (x.shape[-1],), eps=eps)  # one fused op: same formula
    count = mask.sum(-1, keepdim=True).clamp_min(1e-6)
    return x * mask * torch.rsqrt((x.pow(2) * mask).sum(-1, keepdim=True) / count + eps)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        y = masked_rms(x.float(), mask, self.eps)
        return (self.weight.float() * y).to(dtype)


class GatedRMSNorm(nn.Module):
    """y = weight * rmsnorm_per_group(x * silu(z)), computed in fp32.

    The inner channels are split into `n_groups` equal groups (one per SSM group) and each group
    is normalised on its own; `mask` (inner,) restricts the statistics to active heads' channels.
    """

    def __init__(self, size: int, n_groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.n_groups = n_groups
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() * F.silu(z.float())
        *lead, size = h.shape
        h = h.view(*lead, self.n_groups, size // self.n_groups)  # (..., G, inner/G)
        m = None if mask is None else mask.view(self.n_groups, size // self.n_groups)
        h = masked_rms(h, m, self.eps).view(*lead, size)
        return self.weight * h.to(dtype)
