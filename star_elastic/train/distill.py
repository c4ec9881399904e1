"""Knowledge-distillation losses (paper, pipeline point 5): logit KL from the frozen parent."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
