"""Grouped-query attention of Nemotron-H: no positional embedding at all, causal, KV cache.

Position information comes from the Mamba-2 layers, so queries and keys are used as projected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of one attention layer, (B, kv_heads, T, head_dim), grown by doubling."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kv_heads, t, hd) after the cached ones; return all keys and values."""
        t = k.shape[2]
        if self.k is None:
            self.k = k.new_empty(*k.shape[:2], max(2 * t, 16), k.shape[3])
            self.v = v.new_empty(*v.shape[:2], max(2 * t, 16), v.shape[3])
        elif self.length + t > self.k.shape[2]:
            extra = max(self.k.shape[2], t)
            self.k = torch.cat([self.k, self.k.new_empty(*self.k.shape[:2], extra, self.k.shape[3])], dim=2)
            self.v = torch.cat([self.v, self.v.new_empty(*self.v.shape[:2], extra, self.v.shape[3])], dim=2)
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); attn_mask (B, 1, T, S) boolean, None meaning plain causal; head_mask (nh,)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)
        gqa = self.num_heads != self.num_kv_heads
        if attn_mask is None:
            # no padding, no earlier tokens: plain causal (T == S here)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        if head_mask is not None:
            y = y * head_mask.to(y.dtype)[None, :, None, None]
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)
