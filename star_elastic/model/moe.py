"""Mixture of experts of Nemotron-H: sigmoid router with correction bias, relu² experts, shared expert.

Routing (as transformers' NemotronHTopkRouter with n_group = 1):
  scores = sigmoid(gate(x)) in fp32; top-k chosen on scores + e_score_correction_bias (the bias
  steers selection only); weights = chosen scores / their sum * routed_scaling_factor.
Experts are stored as 3D tensors (E, I, C) / (E, C, I) like transformers holds them in memory;
the on-disk layout (one tensor per expert) is handled by `star_elastic.hf`. Tokens sorted by expert
run as one grouped GEMM (`torch._grouped_mm`) per projection where it runs, else one matmul pair
per expert; both give the same numbers (tests/test_moe_grouped.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from star_elastic.config import ModelConfig
from star_elastic.model.mlp import MLP, relu2


def keeps_fp32(key: str) -> bool:
    """Tensors held and stored in fp32 whatever the model's dtype: the correction bias only steers
    top-k selection, where a BF16 rounding flips near-tied experts (transformers keeps it fp32 too)."""
    return key.endswith("e_score_correction_bias")


class TopkRouter(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.scaling, self.normalise = cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` / `.half()` move the correction bias but keep its fp32 values unrounded."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.float().to(self.e_score_correction_bias.device)
        return self

    def forward(self, x: torch.Tensor, expert_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, C) → weights (n, k) fp32, indices (n, k). Masked-out experts cannot be chosen."""
        scores = torch.sigmoid(x.float() @ self.weight.float().t())  # (n, E)
        choice = scores + self.e_score_correction_bias
        if expert_mask is not None:
            choice = choice.masked_fill(expert_mask == 0, float("-inf"))
        idx = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices  # (n, k)
        w = scores.gather(1, idx)
        if self.normalise:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        if expert_mask is not None:  # value 1 for chosen experts; carries the router's gradient
            w = w * expert_mask.float()[idx]
        return w * self.scaling, idx


def grouped_mm_runs(x: torch.Tensor, *dims: int) -> bool:
    """Whether `torch._grouped_mm` serves x's device and dtype: CUDA sm90+ or CPU, with every inner
    dimension a multiple of 16 bytes (its stride requirement)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    if not (x.is_cuda or x.device.type == "cpu"):
        return False
    return all(d * x.element_size() % 16 == 0 for d in dims)


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, I, C = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts = E
        self.up_proj = nn.Parameter(torch.empty(E, I, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, I))
        # optional activation quantizer (x, expert, "up" | "down") → x, set by star_elastic.quant
        self.act_quant: Callable[[torch.Tensor, int, str], torch.Tensor] | None = None
        self.grouped: bool | None = None
        """True / False force the grouped GEMM / the per-expert loop; None: grouped where it runs."""

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.act_quant is not None or self.grouped is False:  # quantizers act per expert
            return False
        return grouped_mm_runs(x, *self.up_proj.shape[1:]) and x.dtype == self.up_proj.dtype

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor, inter_mask: torch.Tensor | None) -> torch.Tensor:
        """xs (m, C) sorted by expert, counts (E,) → (m, C): one grouped GEMM per projection."""
        offs = torch.cumsum(counts, 0).to(torch.int32)  # end row of each expert's group
        h = relu2(torch._grouped_mm(xs, self.up_proj.transpose(-2, -1), offs=offs))  # (m, I)
        if inter_mask is not None:
            h = h * inter_mask.to(h.dtype)
        return torch._grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offs)

    def _expert(self, e: int, x: torch.Tensor, inter_mask: torch.Tensor | None) -> torch.Tensor:
        """Expert e on its tokens x (n, C) → (n, C)."""
        if self.act_quant is not None:
            x = self.act_quant(x, e, "up")
        h = relu2(x @ self.up_proj[e].t())  # (n, I)
        if inter_mask is not None:
            h = h * inter_mask.to(h.dtype)
        if self.act_quant is not None:
            h = self.act_quant(h, e, "down")
        return h @ self.down_proj[e].t()

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, inter_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (n, C), weights/idx (n, k) → (n, C). Tokens are sorted by expert, one matmul pair each."""
        n, k = idx.shape
        if n * k <= self.num_experts // 2:  # decode-sized: walk the few slots, skip the sort
            return self._few_tokens(x, weights, idx, inter_mask)
        flat = idx.reshape(-1)  # (n*k,) expert of each (token, slot)
        order = torch.argsort(flat, stable=True)
        token = order // k  # token of each sorted slot
        counts = torch.bincount(flat, minlength=self.num_experts)
        xs = x[token]  # (n*k, C) grouped by expert
        if self._use_grouped(x):
            out = self._grouped(xs, counts, inter_mask).float()
        else:
            out = self._loop(xs, counts.tolist(), inter_mask)
        out = out * weights.reshape(-1)[order].unsqueeze(-1)  # routing weight in fp32, as transformers
        y = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
        return y.index_add_(0, token, out).to(x.dtype)

    def _loop(self, xs: torch.Tensor, counts: list[int], inter_mask) -> torch.Tensor:
        """xs (m, C) sorted by expert → (m, C) fp32, one matmul pair per expert."""
        out = torch.empty(xs.shape, dtype=torch.float32, device=xs.device)
        start = 0
        for e, count in enumerate(counts):
            if count:
                out[start : start + count] = self._expert(e, xs[start : start + count], inter_mask)
                start += count
        return out

    def _few_tokens(self, x, weights, idx, inter_mask) -> torch.Tensor:
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        experts = idx.tolist()
        for i in range(idx.shape[0]):
            for j, e in enumerate(experts[i]):
                y[i] += self._expert(e, x[i : i + 1], inter_mask)[0].float() * weights[i, j]
        return y.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = TopkRouter(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size, cfg.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        expert_mask: torch.Tensor | None = None,
        inter_mask: torch.Tensor | None = None,
        shared_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (n, C)
        weights, idx = self.gate(flat, expert_mask)
        routed = self.experts(flat, weights, idx, inter_mask).view(shape)
        return routed + self.shared_experts(x, shared_mask)
