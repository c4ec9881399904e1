"""HybridLM: the Nemotron-H language model (Mamba-2 / attention / MoE / MLP by layer pattern).

embeddings → blocks (x + mixer(RMSNorm(x)), mixer chosen by the pattern character) → norm_f →
lm_head. Module names are those of NVIDIA's checkpoints (`backbone.layers.N.mixer.in_proj`, ...),
so the state dict is the on-disk contract except for experts, which are stored per expert on disk
(see `star_elastic.hf`).

Every forward accepts `Masks`: per-axis channel/head/expert/layer masks. With 0/1 masks the model
computes exactly what the physically sliced smaller model computes; the elastic model builds
them, and no other code path exists for a submodel.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from star_elastic.config import ModelConfig
from star_elastic.model.attention import Attention, KVCache
from star_elastic.model.mamba2 import Mamba2Mixer, MambaState
from star_elastic.model.mlp import MLP
from star_elastic.model.moe import MoE
from star_elastic.model.norm import RMSNorm


@dataclasses.dataclass
class Masks:
    """Active components per axis; None means all active. Shapes are the full model's sizes."""

    hidden: torch.Tensor | None = None  # (C,) residual-stream channels
    attn_heads: torch.Tensor | None = None  # (num_attention_heads,)
    mamba_heads: torch.Tensor | None = None  # (mamba_num_heads,)
    experts: torch.Tensor | None = None  # (n_routed_experts,) inactive ones are never routed to
    expert_inter: torch.Tensor | None = None  # (moe_intermediate_size,)
    shared_inter: torch.Tensor | None = None  # (moe_shared_expert_intermediate_size,)
    mlp_inter: torch.Tensor | None = None  # (intermediate_size,)
    layers: torch.Tensor | None = None  # (num_layers,) 0 = layer skipped (identity)


class HybridCache:
    """Decoding state for every layer plus the padding mask of all tokens seen so far."""

    def __init__(self, cfg: ModelConfig):
        self.layers: list[KVCache | MambaState | None] = [
            KVCache() if c == "*" else MambaState() if c == "M" else None for c in cfg.pattern
        ]
        self.valid: torch.Tensor | None = None  # (B, S) bool: real (not padding) tokens
        self.padded = False

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        if kind == "M":
            self.mixer = Mamba2Mixer(cfg)
        elif kind == "*":
            self.mixer = Attention(
                cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.attention_bias
            )
        elif kind == "E":
            self.mixer = MoE(cfg)
        else:
            self.mixer = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x, state, attn_mask, pad_mask, masks: Masks, seq_idx=None) -> torch.Tensor:
        h = self.norm(x, masks.hidden)
        if self.kind == "M":
            h = self.mixer(h, state, pad_mask, masks.mamba_heads, seq_idx)
        elif self.kind == "*":
            h = self.mixer(h, state, attn_mask, masks.attn_heads)
        elif self.kind == "E":
            h = self.mixer(h, masks.experts, masks.expert_inter, masks.shared_inter)
        else:
            h = self.mixer(h, masks.mlp_inter)
        return h


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, c) for c in cfg.pattern)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.tokenizer = None  # set by loaders; saved next to the weights

    # --- forward --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        masks: Masks | None = None,
        last_only: bool = False,
        head: bool = True,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) → fp32 logits (B, T, vocab), or (B, 1, vocab) with `last_only`.

        head=False returns the final-normed hidden states (B, T, C) instead, for losses that apply
        `lm_head` in token chunks (train/distill.py) rather than hold the full logits.

        attention_mask (B, T): 1 for real tokens, 0 for (left) padding. `cache` is updated in place.

        seq_idx (B, T) integer, non-decreasing along T: the index of each token's document in a
        packed training row (as mamba_ssm's / vLLM's). Every document is then computed as if alone:
        attention is causal within it, and the Mamba-2 conv window and state start afresh at it.
        None (or one document in every row, which takes the same path) is one document per row.
        Not with a cache: generation runs one document per row.
        """
        masks = masks or Masks()
        seq_idx = self._documents(input_ids, cache, seq_idx)
        x = self.backbone.embeddings(input_ids)
        if masks.hidden is not None:
            x = x * masks.hidden.to(x.dtype)
        attn_mask, pad_mask = self._attention_masks(input_ids, cache, attention_mask, seq_idx)
        for i, block in enumerate(self.backbone.layers):
            state = None if cache is None else cache.layers[i]
            h = block(x, state, attn_mask, pad_mask, masks, seq_idx)
            if masks.layers is not None:
                h = h * masks.layers[i].to(h.dtype)
            x = x + h
        if last_only:
            x = x[:, -1:]
        x = self.backbone.norm_f(x, masks.hidden)
        return self.lm_head(x).float() if head else x

    @staticmethod
    def _documents(ids, cache, seq_idx):
        """seq_idx checked; None where every row is one document (the unpacked path runs then)."""
        if seq_idx is None:
            return None
        if cache is not None:
            raise ValueError("seq_idx (packed documents) is for training forwards; cached generation runs one "
                             "document per row: pass seq_idx=None with a cache")
        if seq_idx.shape != ids.shape or seq_idx.is_floating_point() or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be integer document indices shaped like input_ids {tuple(ids.shape)}, "
                             f"got {seq_idx.dtype} {tuple(seq_idx.shape)}")
        steps = seq_idx.diff(dim=1)  # (B, T-1)
        decreasing, packed = torch.stack([(steps < 0).any(), (steps != 0).any()]).tolist()  # one sync
        if decreasing:
            raise ValueError("seq_idx must be non-decreasing along each row: the index of each token's document "
                             "within its row (0, 0, 0, 1, 1, 2, ...)")
        return seq_idx if packed else None

    def _attention_masks(self, ids, cache, attention_mask, seq_idx=None):
        """Boolean (B, 1, T, S) attention mask, or None when plain causal attention is exact."""
        B, T = ids.shape
        new_valid = (
            torch.ones(B, T, dtype=torch.bool, device=ids.device) if attention_mask is None else attention_mask.bool()
        )
        past = 0 if cache is None else cache.length
        if cache is not None:
            cache.valid = new_valid if cache.valid is None else torch.cat([cache.valid, new_valid], dim=1)
            cache.padded = cache.padded or attention_mask is not None and not bool(new_valid.all())
            valid, padded = cache.valid, cache.padded
        else:
            valid, padded = new_valid, attention_mask is not None and not bool(new_valid.all())
        pad_mask = attention_mask.to(self.lm_head.weight.dtype) if padded and attention_mask is not None else None
        if not padded and (past == 0 or T == 1) and seq_idx is None:
            return None, pad_mask
        S = valid.shape[1]
        q_pos = torch.arange(past, past + T, device=ids.device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=ids.device)[None, :]  # (1, S)
        allowed = (k_pos <= q_pos) & valid[:, None, :]  # (B, T, S)
        if seq_idx is not None:  # no cache, so S == T: block-diagonal causal
            allowed &= seq_idx[:, :, None] == seq_idx[:, None, :]
        allowed |= k_pos == q_pos  # a padding query still sees itself: no all-masked row, no NaN
        return allowed.unsqueeze(1), pad_mask

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer=None) -> HybridLM:
        """A model holding exactly `state`'s tensors (no copy, no init); a tied head is re-tied."""
        with torch.device("meta"):
            model = cls(cfg)
        state = dict(state)
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["backbone.embeddings.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.backbone.embeddings.weight
        model.tokenizer = tokenizer
        return model

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> HybridLM:
        """Deterministic random init in the spirit of transformers' NemotronH init."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.config
        std = cfg.initializer_range
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or "e_score_correction_bias" in name:
                p.zero_()
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.fill_(1.0)
            elif leaf == "A_log":
                p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)))
            elif leaf == "D":
                p.fill_(1.0)
            elif leaf == "dt_bias":
                lo, hi = math.log(cfg.time_step_min), math.log(0.1)
                dt = torch.exp(torch.rand(p.numel(), generator=g) * (hi - lo) + lo).clamp_min(1e-4)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif "conv1d.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                scale = std / math.sqrt(2 * cfg.num_layers) if leaf in ("weight", "down_proj") and (
                    "out_proj" in name or "o_proj" in name or "down_proj" in name
                ) else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> HybridCache:
        return HybridCache(self.config)
