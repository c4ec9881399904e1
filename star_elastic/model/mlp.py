"""Dense MLP of Nemotron-H: down(relu²(up(x))), no gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor, inter_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = relu2(self.up_proj(x))  # (..., I)
        if inter_mask is not None:
            h = h * inter_mask.to(h.dtype)
        return self.down_proj(h)
