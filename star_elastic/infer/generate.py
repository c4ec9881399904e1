"""Cached generation for HybridLM: greedy or sampled, batched prompts of different lengths.

Prompts are left-padded; the padding mask keeps pad tokens out of attention and out of the Mamba
conv window and state, so each row decodes as if it were alone. One prefill pass fills every
layer's cache, then each new token costs one O(1) Mamba step and one attention step per layer.
`DecodeBatch` is that loop one step at a time: rows join between steps (their prefill cache is
stacked onto the running one, left-padded in time) and leave when done, so `generate` and the
server's continuous-batching scheduler share the same prefill, step and sampling code.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from star_elastic.config import ConfigError
from star_elastic.model.attention import KVCache
from star_elastic.model.hybrid import HybridCache, HybridLM, Masks
from star_elastic.model.mamba2 import MambaState


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
    ids, attn = left_pad(prompts, _pad_id(model), model.device)
    cache = model.new_cache()
    padded = bool((attn == 0).any())
    logits = model(ids, cache=cache, attention_mask=attn if padded else None, masks=masks, last_only=True)
    return cache, logits[:, -1]


def _pad_id(model: HybridLM) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


# --- cache rows: join and leave a running batch ------------------------------------------------
def concat_caches(caches: Sequence[HybridCache]) -> HybridCache:
    """Stack caches along the batch, left-padding shorter ones in time (padding is masked out)."""
    width = max(c.length for c in caches)
    out = copy.copy(caches[0])
    out.valid = torch.cat([F.pad(c.valid, (width - c.length, 0), value=False) for c in caches])
    out.padded = any(c.padded or c.length < width for c in caches)
    out.layers = [_concat_layer([c.layers[i] for c in caches], width) for i in range(len(out.layers))]
    return out


def _concat_layer(states: list, width: int):
    first = states[0]
    if isinstance(first, KVCache):  # keys/values (B, kv, S, hd): pad S on the left
        kv = KVCache()
        kv.k = torch.cat([F.pad(s.k[:, :, : s.length], (0, 0, width - s.length, 0)) for s in states])
        kv.v = torch.cat([F.pad(s.v[:, :, : s.length], (0, 0, width - s.length, 0)) for s in states])
        kv.length = width
        return kv
    if isinstance(first, MambaState):  # conv window and SSM state are per row, no time axis
        ms = MambaState()
        ms.conv = torch.cat([s.conv for s in states])
        ms.ssm = torch.cat([s.ssm for s in states])
        return ms
    return None


def select_rows(cache: HybridCache, rows: Sequence[int]) -> HybridCache:
    """Keep `rows` of the batch, then drop leading time steps that are padding in every kept row."""
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=cache.valid.device)
    valid = cache.valid.index_select(0, idx)
    start = int(valid.any(0).long().argmax())  # first time step some kept row uses
    out = copy.copy(cache)
    out.valid = valid[:, start:]
    out.padded = not bool(out.valid.all())
    out.layers = [_select_layer(s, idx, start) for s in cache.layers]
    return out


def _select_layer(state, idx: torch.Tensor, start: int):
    if isinstance(state, KVCache):
        kv = KVCache()
        kv.k = state.k[:, :, start : state.length].index_select(0, idx)
        kv.v = state.v[:, :, start : state.length].index_select(0, idx)
        kv.length = state.length - start
        return kv
    if isinstance(state, MambaState):
        ms = MambaState()
        ms.conv, ms.ssm = state.conv.index_select(0, idx), state.ssm.index_select(0, idx)
        return ms
    return None


# --- the decode step shared by generate() and the server's scheduler ---------------------------
@dataclasses.dataclass(eq=False)
class Row:
    """One sequence being decoded: its prompt, how to decode it, and what it produced so far."""

    prompt: list[int]
    cfg: GenerationConfig
    generator: torch.Generator | None = None
    on_token: Callable[[int], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None
    """None while decoding; "stop" (stop token or string) or "length" (max_new_tokens) when done."""
    forced: list[int] = dataclasses.field(default_factory=list)
    """Tokens still to feed, one per step, before the row samples again (a continuation's context
    that its cache has not seen yet); they are not outputs."""


class DecodeBatch:
    """Rows decoding together on one model. Rows join (batched prefill, caches stacked) and leave
    (cache rows selected) between steps; each row's tokens do not depend on the other rows.
    """

    def __init__(self, model: HybridLM, masks: Masks | None = None, tokenizer=None,
                 continuation: Callable[[Row], Row | None] | None = None):
        self.model, self.masks, self.tokenizer = model, masks, tokenizer
        self.continuation = continuation
        """Called on each row that finishes in `step`: a returned row takes its place and its cache
        (feeding its `forced` tokens first); None lets the finished row leave."""
        self.rows: list[Row] = []
        self.cache: HybridCache | None = None
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of each row

    @torch.inference_mode()
    def join(self, rows: Sequence[Row]) -> None:
        """Prefill `rows` and add them to the batch; rows with nothing to generate finish at once."""
        for r in rows:
            if r.cfg.stop_strings and self.tokenizer is None:
                raise ConfigError("stop_strings need a tokenizer to decode the output")
            if r.cfg.max_new_tokens == 0:
                r.finish = "length"
        rows = [r for r in rows if r.finish is None]
        if not rows:
            return
        cache, logits = prefill(self.model, [r.prompt for r in rows], self.masks)
        if self.rows:
            cache, logits = concat_caches([self.cache, cache]), torch.cat([self.logits, logits])
        self.rows, self.cache, self.logits = self.rows + list(rows), cache, logits

    @torch.inference_mode()
    def leave(self, rows: Sequence[Row]) -> None:
        """Remove rows (finished or cancelled) from the batch."""
        gone = set(map(id, rows))
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.logits = None
            return
        self.cache = select_rows(self.cache, keep)
        self.logits = self.logits[torch.as_tensor(keep, device=self.logits.device)]

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Sample one token per row (or feed its next forced token), drop finished rows or put
        their continuations in their place, feed the rest; return the rows that finished."""
        tokens = self._sample()
        finished, feed = [], []
        for i, (r, tok) in enumerate(zip(self.rows, tokens)):
            if r.forced:
                feed.append(r.forced.pop(0))
                continue
            r.tokens.append(tok)
            if r.on_token is not None:
                r.on_token(tok)
            if tok in r.cfg.stop_token_ids or _hit_stop_string(r.tokens, r.cfg.stop_strings, self.tokenizer):
                r.finish = "stop"
            elif len(r.tokens) >= r.cfg.max_new_tokens:
                r.finish = "length"
            if r.finish is None:
                feed.append(tok)
                continue
            finished.append(r)
            nxt = self.continuation(r) if self.continuation is not None else None
            if nxt is None:
                feed.append(None)
            else:  # the continuation takes over the row's cache; its context's first token is fed now
                self.rows[i] = nxt
                feed.append(nxt.forced.pop(0))
        self.leave([r for r, tok in zip(self.rows, feed) if tok is None])
        if self.rows:
            fed = torch.tensor([tok for tok in feed if tok is not None], device=self.logits.device)[:, None]  # (B, 1)
            self.logits = self.model(fed, cache=self.cache, masks=self.masks, last_only=True)[:, -1]
        return finished

    def _sample(self) -> list[int]:
        """Greedy rows take one batched argmax; sampled rows draw from their own generator (rows
        with forced tokens draw nothing)."""
        out = self.logits.argmax(-1).tolist()
        for i, r in enumerate(self.rows):
            if r.cfg.temperature > 0 and not r.forced:
                out[i] = int(sample_next(self.logits[i : i + 1], r.cfg, r.generator)[0])
        return out


def seeded_generator(seed: int | None, device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _hit_stop_string(tokens: list[int], stops: tuple[str, ...], tokenizer) -> bool:
    if not stops:
        return False
    tail = tokenizer.decode(tokens[-32:], skip_special_tokens=False)
    return any(s in tail for s in stops)


def decode_to_end(batch: DecodeBatch) -> None:
    """Step until every row of the batch has finished."""
    while batch.rows:
        batch.step()


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
    if cfg.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need a tokenizer to decode the output")
    generator = seeded_generator(cfg.seed, model.device)  # one stream shared by the rows, in row order
    rows = [Row(list(p), cfg, generator, None if on_token is None else functools.partial(on_token, i))
            for i, p in enumerate(prompts)]
    batch = DecodeBatch(model, masks, tokenizer)
    batch.join(rows)
    decode_to_end(batch)
    return [r.tokens for r in rows]
