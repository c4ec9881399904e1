"""Cached generation for HybridLM: greedy or sampled, batched prompts of different lengths.

Prompts are left-padded; the padding mask keeps pad tokens out of attention and out of the Mamba
conv window and state, so each row decodes as if it were alone. One prefill pass fills every
layer's cache, then each new token costs one O(1) Mamba step and one attention step per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from star_elastic.config import ConfigError
from star_elastic.model.hybrid import HybridCache, HybridLM, Masks


@dataclasses.dataclass
class GenerationConfig:
    """How to decode."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens per prompt."""
    temperature: float = 0.0
    """0 means greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop_token_ids: tuple[int, ...] = ()
    """A row stops after emitting any of these (the stop token is kept in the output)."""
    stop_strings: tuple[str, ...] = ()
    """A row stops once its decoded output contains one of these (needs a tokenizer)."""
    seed: int | None = None
    """Seed of the sampling generator; None uses torch's global RNG."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → ids (B, T) left-padded with pad_id, mask (B, T) 1 on real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) → next token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p  # tokens before the mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def prefill(
    model: HybridLM, prompts: Sequence[Sequence[int]], masks: Masks | None = None
) -> tuple[HybridCache, torch.Tensor]:
    """Run the prompts once; return the filled cache and last-position logits (B, V)."""
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, attn = left_pad(prompts, pad, model.device)
    cache = model.new_cache()
    padded = bool((attn == 0).any())
    logits = model(ids, cache=cache, attention_mask=attn if padded else None, masks=masks, last_only=True)
    return cache, logits[:, -1]


@torch.inference_mode()
def decode(
    model: HybridLM,
    cache: HybridCache,
    logits: torch.Tensor,
    cfg: GenerationConfig,
    masks: Masks | None = None,
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Continue from `cache` and the current logits (B, V); return the new tokens of each row."""
    if cfg.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need a tokenizer to decode the output")
    generator = None if cfg.seed is None else torch.Generator(device=logits.device).manual_seed(cfg.seed)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    B = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stop_ids = set(cfg.stop_token_ids)
    for step in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator)
        tokens = nxt.tolist()
        for i, tok in enumerate(tokens):
            if done[i]:
                continue
            out[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            done[i] = tok in stop_ids or _hit_stop_string(out[i], cfg.stop_strings, tokenizer)
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        feed = torch.tensor([pad if d else t for d, t in zip(done, tokens)], device=logits.device)
        logits = model(feed[:, None], cache=cache, masks=masks, last_only=True)[:, -1]
    return out


def _hit_stop_string(tokens: list[int], stops: tuple[str, ...], tokenizer) -> bool:
    if not stops:
        return False
    tail = tokenizer.decode(tokens[-32:], skip_special_tokens=False)
    return any(s in tail for s in stops)


def generate(
    model: HybridLM,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    masks: Masks | None = None,
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generate continuations of token-id prompts; returns new token ids per prompt."""
    cfg = cfg or GenerationConfig()
    if cfg.max_new_tokens == 0:
        return [[] for _ in prompts]
    cache, logits = prefill(model, prompts, masks)
    return decode(model, cache, logits, cfg, masks, tokenizer, on_token)
