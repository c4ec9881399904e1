"""Knowledge-distillation losses (paper, pipeline point 5): logit KL from the frozen parent.

`kd_loss` / `lm_loss` take full logits (the reference, and QAD on small models). Elastification
uses `chunked_distill_sums`: from the final hidden states through each model's LM head a chunk of
tokens at a time, so no full (B, T, V) fp32 tensor exists (at 8K tokens x 131,072 vocabulary one
is 4.3 GB). `DistillStep` is the student side of one step as one module, so that the parallel
engine (star_elastic.distributed) can wrap it without the recipe knowing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from star_elastic.elastic.arch import IndexSets


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over unmasked positions of KL(teacher ‖ student) at `temperature`, times T².

    student/teacher (B, T, V) logits; mask (B, T) 1 where the position counts (padding is 0).
    Softmaxes are taken in fp32 whatever the logits' dtype.
    """
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1) * t * t


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on positions whose *target* is unmasked. logits (B, T, V), ids (B, T)."""
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].to(losses.dtype)
    return (losses * m).sum() / m.sum().clamp_min(1)


def _chunk_sums(h_s, h_t, kd_mask, targets, lm_mask, head_s, head_t, temperature):
    """One chunk of n tokens: h_s/h_t (n, C) → (Σ KL·T² over kd_mask, Σ next-token CE over lm_mask)."""
    t = temperature
    with torch.no_grad():
        log_p_t = F.log_softmax(head_t(h_t).float() / t, dim=-1)  # (n, V)
    logits = head_s(h_s).float()  # (n, V)
    log_p_s = F.log_softmax(logits / t, dim=-1)
    kl = ((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * kd_mask).sum() * t * t
    log_q = log_p_s if t == 1.0 else F.log_softmax(logits, dim=-1)
    ce = -(log_q.gather(1, targets[:, None])[:, 0] * lm_mask).sum()
    return kl, ce


def chunked_distill_sums(h_s: torch.Tensor, h_t: torch.Tensor, head_s: nn.Module, head_t: nn.Module,
                         kd_mask: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 1024,
                         ids: torch.Tensor | None = None, lm_mask: torch.Tensor | None = None):
    """(Σ KL(teacher ‖ student)·T² over kd_mask, Σ next-token CE over lm_mask's targets), fp32 scalars.

    h_s/h_t (B, T, C) final hidden states, heads map C → V. Each chunk runs under activation
    checkpointing: its (n, V) logits are recomputed in backward instead of kept, so the peak is a
    few (chunk_tokens, V) fp32 tensors. Divide by the mask counts for the means `kd_loss` / `lm_loss`
    give. Without `ids` the CE sum is 0.
    """
    B, T, C = h_s.shape
    km = kd_mask.reshape(-1).float()
    if ids is None:
        targets = torch.zeros(B * T, dtype=torch.long, device=h_s.device)
        cm = torch.zeros_like(km)
    else:  # position i predicts token i+1; each row's last position has no target
        targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1)
        cm = torch.cat([lm_mask[:, 1:], torch.zeros_like(lm_mask[:, :1])], dim=1).reshape(-1).float()
    hs, ht = h_s.reshape(B * T, C), h_t.reshape(B * T, C)
    kl = ce = torch.zeros((), dtype=torch.float32, device=h_s.device)
    for s in range(0, B * T, chunk_tokens):
        part = slice(s, s + chunk_tokens)
        k, c = checkpoint(_chunk_sums, hs[part], ht[part], km[part], targets[part], cm[part], head_s, head_t,
                          temperature, use_reentrant=False)
        kl, ce = kl + k, ce + c
    return kl, ce


class DistillStep(nn.Module):
    """Student side of one step: a forward of `elastic` at `budget` → chunked KD (and LM) sums.

    Elastification samples each step's architecture with the router (Gumbel, temperature `tau`);
    with `architectures` (budget → Architecture, the router frozen: QAD) the budget's fixed
    architecture runs instead, and `tau` / `generator` are None.
    """

    def __init__(self, elastic: nn.Module, chunk_tokens: int = 1024, architectures: dict | None = None,
                 route_always: bool = False):
        super().__init__()
        self.elastic, self.chunk_tokens, self.architectures = elastic, chunk_tokens, architectures
        self.route_always = route_always
        """The full model (budget 1, which needs no router) runs the router too, first and with zero
        weight in the loss: FSDP2 gathers and reduces a unit only on the processes that call it, so
        processes that train different budgets in the same micro-batch (budget_sampling micro_batch)
        must all call it, in the same order (its backward, like a sampled budget's, comes last)."""

    def forward(self, ids, budget: float, tau: float | None, generator, teacher_hidden, teacher_head, kd_mask,
                temperature: float = 1.0, lm_mask=None, seq_idx=None):
        """→ (KL sum, CE sum, picks); CE only when lm_mask is given; picks None for a fixed architecture.

        seq_idx (B, T): documents of packed rows (`HybridLM.forward`); teacher_hidden must come from
        the teacher run with the same seq_idx. A target that starts a document is predicted from
        another one: lm_mask must be 0 there for the CE to be that of the documents run alone."""
        unused = 0.0
        if self.architectures is None:
            if self.route_always and budget >= 1.0:  # first, as forward_sampled runs it below 1 (the same order
                logits = self.elastic.router(self.elastic.budget_vector(budget).to(ids.device))  # of collectives)
                unused = sum(x.sum() for x in logits.values()) * 0.0  # zero gradients, present on every process
            hidden, picks = self.elastic.forward_sampled(ids, budget, tau, generator, head=False, seq_idx=seq_idx)
        else:
            masks = IndexSets.prefix(self.elastic.config, self.architectures[budget]).masks(device=ids.device)
            hidden, picks = self.elastic.model(ids, masks=masks, head=False, seq_idx=seq_idx), None
        kl, ce = chunked_distill_sums(hidden, teacher_hidden, self.elastic.model.lm_head, teacher_head, kd_mask,
                                      temperature, self.chunk_tokens, None if lm_mask is None else ids, lm_mask)
        return kl + unused, ce, picks
