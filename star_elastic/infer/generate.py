"""Cached generation for HybridLM: greedy or sampled, batched prompts of different lengths.

Prompts are left-padded; the padding mask keeps pad tokens out of attention and out of the Mamba
conv window and state, so each row decodes as if it were alone. One prefill pass fills every
layer's cache, then each new token costs one O(1) Mamba step and one attention step per layer.
`DecodeBatch` is that loop one step at a time: rows join between steps (their prefill cache is
stacked onto the running one, left-padded in time) and leave when done, so `generate` and the
server's continuous-batching scheduler share the same prefill, step and sampling code.

Log-probabilities, for rows that ask (`GenerationConfig.logprobs`, `Row.score_prompt`), are those of
the raw model distribution: log_softmax of the logits, before temperature and top_p.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

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
    logprobs: int | None = None
    """Keep each sampled token's log-probability and the `logprobs` most likely tokens' (0: the sampled
    token's only); None keeps none. Raw model distribution: log_softmax of the logits, before
    temperature and top_p."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ConfigError(f"logprobs must be >= 0 or None, got {self.logprobs}")
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
        keep[..., 0] = True  # the most likely always: a top_p below float32's range compares as 0
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Logprob(NamedTuple):
    """One position's log-probabilities: the token's, and the top K as (id, logprob), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[Logprob]:
    """logits (N, V) and the tokens (N,) taken at those positions → each token's log-probability
    (log_softmax in fp32) and the k most likely tokens'."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens[:, None].to(lp.device))[:, 0].tolist()
    k = min(k, lp.shape[-1])
    if k == 0:
        return [Logprob(c, ()) for c in chosen]
    values, ids = lp.topk(k, dim=-1)
    return [Logprob(c, tuple(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


SCORE_CHUNK = 256  # prompt positions per lm_head call when scoring: (256, V) fp32 logits at a time


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


@torch.inference_mode()
def prefill_scored(
    model: HybridLM, rows: Sequence[Row], masks: Masks | None = None, isolate: bool = False
) -> tuple[HybridCache, torch.Tensor]:
    """`prefill` that also fills each row's `prompt_logprobs`: its first `score_prompt` tokens' log-probabilities
    under the model (the first token's None), top `cfg.logprobs` each. The whole hidden sequence is kept
    and `lm_head` runs on the scored positions in chunks of `SCORE_CHUNK`; rows that do not score use
    `prefill` (batched apart, so their logits do not depend on this). `isolate`: a row whose scoring
    fails gets `error` set instead of raising."""
    prompts = [r.prompt for r in rows]
    ids, attn = left_pad(prompts, _pad_id(model), model.device)
    cache = model.new_cache()
    padded = bool((attn == 0).any())
    hidden = model(ids, cache=cache, attention_mask=attn if padded else None, masks=masks, head=False)  # (B, T, C)
    for i, r in enumerate(rows):
        try:
            r.prompt_logprobs = _score(model, hidden[i, hidden.shape[1] - len(r.prompt):], r)
        except Exception as err:  # noqa: BLE001 - one row's failure stays that row's (isolate)
            if not isolate:
                raise
            r.finish, r.error = "error", err
    return cache, model.lm_head(hidden[:, -1]).float()


def _score(model: HybridLM, hidden: torch.Tensor, row: Row) -> list[Logprob | None]:
    """hidden (T, C) of one prompt's real positions → log-probabilities of its first `score_prompt` tokens."""
    n = min(row.score_prompt, len(row.prompt))
    targets = torch.as_tensor(row.prompt[1:n], dtype=torch.long)
    out: list[Logprob | None] = [None]  # nothing predicts the first token
    for c in range(0, n - 1, SCORE_CHUNK):  # position p predicts token p + 1
        logits = model.lm_head(hidden[c : min(c + SCORE_CHUNK, n - 1)])
        out += logprobs_of(logits, targets[c : c + SCORE_CHUNK], row.cfg.logprobs or 0)
    return out


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
    score_prompt: int = 0
    """Leading prompt tokens whose log-probabilities the prefill keeps in `prompt_logprobs`."""
    token_logprobs: list[Logprob] = dataclasses.field(default_factory=list)
    """One per sampled token when `cfg.logprobs` is set (tokens appended by others have none)."""
    prompt_logprobs: list[Logprob | None] | None = None
    error: Exception | None = None
    """Why the row failed (its finish is then "error"); set only in a batch that isolates rows."""


class DecodeBatch:
    """Rows decoding together on one model. Rows join (batched prefill, caches stacked) and leave
    (cache rows selected) between steps; each row's tokens do not depend on the other rows.

    `isolate_rows` (the server): an exception in one row's own work (sampling, its log-probabilities,
    its `on_token`, its stop strings, its continuation) ends that row alone with finish "error" and
    `error` set, returned by `step` with the finished rows; the other rows go on as if it had left.
    Without it (`generate`) the exception propagates. A forward failure raises either way.
    """

    def __init__(self, model: HybridLM, masks: Masks | None = None, tokenizer=None,
                 continuation: Callable[[Row], Row | None] | None = None, isolate_rows: bool = False):
        self.model, self.masks, self.tokenizer = model, masks, tokenizer
        self.continuation = continuation
        """Called on each row that finishes in `step`: a returned row takes its place and its cache
        (feeding its `forced` tokens first); None lets the finished row leave."""
        self.isolate_rows = isolate_rows
        self.rows: list[Row] = []
        self.cache: HybridCache | None = None
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of each row

    @torch.inference_mode()
    def join(self, rows: Sequence[Row]) -> None:
        """Prefill `rows` and add them to the batch; rows with nothing to generate finish at once
        (after their prompt is scored, if they score it). Nothing changes if a prefill raises."""
        for r in rows:
            if r.cfg.stop_strings and self.tokenizer is None:
                raise ConfigError("stop_strings need a tokenizer to decode the output")
            if r.cfg.max_new_tokens == 0:
                r.finish = "length"
        plain = [r for r in rows if r.finish is None and not r.score_prompt]
        scored = [r for r in rows if r.score_prompt]
        parts = []  # (rows, cache, logits) of each prefill
        if plain:
            parts.append((plain, *prefill(self.model, [r.prompt for r in plain], self.masks)))
        if scored:
            parts.append((scored, *prefill_scored(self.model, scored, self.masks, self.isolate_rows)))
        if not parts:
            return
        joined = self.rows + [r for part_rows, _, _ in parts for r in part_rows]
        caches = ([self.cache] if self.rows else []) + [c for _, c, _ in parts]
        logits = ([self.logits] if self.rows else []) + [lg for _, _, lg in parts]
        cache = caches[0] if len(caches) == 1 else concat_caches(caches)
        self.rows, self.cache, self.logits = joined, cache, torch.cat(logits)
        self.leave([r for r in scored if r.finish is not None])  # scored only, or their scoring failed

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
        scores = self._token_logprobs(tokens)
        finished, feed = [], []
        for i, (r, tok) in enumerate(zip(self.rows, tokens)):
            if r.forced:
                feed.append(r.forced.pop(0))
                continue
            fed = None  # a row whose sampling failed leaves
            if r.error is None:
                try:
                    fed = self._advance(i, r, tok, scores.get(i))
                except Exception as err:  # noqa: BLE001 - isolated: this row alone ends
                    self._fail(r, err)
                    fed = None
            if r.finish is not None:
                finished.append(r)
            feed.append(fed)
        self.leave([r for r, tok in zip(self.rows, feed) if tok is None])
        if self.rows:
            fed = torch.tensor([tok for tok in feed if tok is not None], device=self.logits.device)[:, None]  # (B, 1)
            self.logits = self.model(fed, cache=self.cache, masks=self.masks, last_only=True)[:, -1]
        return finished

    def _advance(self, i: int, r: Row, tok: int, score: Logprob | None) -> int | None:
        """Record row i's sampled token; the token to feed next, or None when the row leaves."""
        r.tokens.append(tok)
        if score is not None:
            r.token_logprobs.append(score)
        if r.on_token is not None:
            r.on_token(tok)
        if tok in r.cfg.stop_token_ids or _hit_stop_string(r.tokens, r.cfg.stop_strings, self.tokenizer):
            r.finish = "stop"
        elif len(r.tokens) >= r.cfg.max_new_tokens:
            r.finish = "length"
        if r.finish is None:
            return tok
        nxt = self.continuation(r) if self.continuation is not None else None
        if nxt is None:
            return None
        first = nxt.forced.pop(0)  # the continuation takes over the row's cache; its context's first token is fed now
        self.rows[i] = nxt
        return first

    def _fail(self, r: Row, err: Exception) -> None:
        if not self.isolate_rows:
            raise err
        r.finish, r.error = "error", err

    def _sample(self) -> list[int]:
        """Greedy rows take one batched argmax; sampled rows draw from their own generator (rows
        with forced tokens draw nothing)."""
        out = self.logits.argmax(-1).tolist()
        for i, r in enumerate(self.rows):
            if r.cfg.temperature > 0 and not r.forced:
                try:
                    out[i] = int(sample_next(self.logits[i : i + 1], r.cfg, r.generator)[0])
                except Exception as err:  # noqa: BLE001 - isolated: this row alone ends
                    self._fail(r, err)
        return out

    def _token_logprobs(self, tokens: list[int]) -> dict[int, Logprob]:
        """Batch index → the sampled token's log-probabilities, for the rows that ask (one log_softmax
        over those rows, top K of the largest K asked, each row's own K kept)."""
        asking = [i for i, r in enumerate(self.rows) if r.cfg.logprobs is not None and not r.forced and r.error is None]
        if not asking:
            return {}
        k = max(self.rows[i].cfg.logprobs for i in asking)
        idx = torch.as_tensor(asking, device=self.logits.device)
        scores = logprobs_of(self.logits[idx], torch.as_tensor([tokens[i] for i in asking]), k)
        return {i: Logprob(s.logprob, s.top[: self.rows[i].cfg.logprobs]) for i, s in zip(asking, scores)}


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
