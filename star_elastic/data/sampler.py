"""The training order over a token store: mixture draws, epoch permutations, packed rows.

A stream of draws d = 0, 1, 2, ... Draw d picks a source from a uniform number hashed from
(seed, d): source s with probability p_s ∝ weight_s / mean document length_s, so that the weights
are the sources' shares of the training tokens. The k-th draw of source s takes document
perm_{seed, s, epoch}(k mod n_s), epoch = k // n_s: each source walks its own epochs, each a
permutation without replacement. The permutation is a keyed Feistel network over the smallest
even power of two ≥ n_s, cycle-walked into [0, n_s): O(1) memory, nothing of size n_s is built;
document lengths are read from the store's memory-mapped offsets.

Draws are packed `window` at a time (`first_fit`); the windows' rows, end to end, are the global
row stream. It does not depend on the number of processes: step s takes rows [s·B, (s+1)·B),
process r of W the rows [s·B + r·B/W, s·B + (r+1)·B/W). Every process computes the same plan
from lengths alone and reads only its own rows' tokens. `state_dict()` is the position in that
stream (the current window's first draw and per-source draw counts, the rows of it already taken):
a resumed run continues at exactly the next row, at any world size.
"""

from __future__ import annotations

import hashlib

import numpy as np

from star_elastic.config import ConfigError
from star_elastic.data.packing import Piece, Rows, assemble, first_fit

STATE_KIND, STATE_VERSION = "packed-sampler", 1
ROUNDS = 6  # Feistel rounds


# --- keyed hashing --------------------------------------------------------------------------
def key_of(*parts) -> int:
    """A 64-bit key from any printable parts (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, a bijection of uint64 that scrambles every bit; (n,) uint64 → (n,) uint64."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(key: int, idx: np.ndarray) -> np.ndarray:
    """Uniform numbers in [0, 1) for indices `idx` (n,) under `key`: (n,) float64."""
    x = mix64(np.asarray(idx, dtype=np.uint64) ^ np.uint64(key))
    return (mix64(x) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def permute(idx: np.ndarray, n: int, key: int) -> np.ndarray:
    """Position(s) `idx` in [0, n) → their image under the keyed bijection of [0, n); (m,) int64."""
    bits = max(2, (n - 1).bit_length())
    half = np.uint64((bits + 1) // 2)  # a balanced network over 2·half bits ≥ n's
    low = np.uint64((1 << int(half)) - 1)
    keys = mix64(np.arange(ROUNDS, dtype=np.uint64) + np.uint64(key))
    x = np.asarray(idx, dtype=np.uint64).copy()
    walking = np.ones(x.shape, dtype=bool)
    while walking.any():  # cycle walking: re-apply until inside [0, n); < 4 passes expected
        y = x[walking]
        left, right = y >> half, y & low
        for k in keys:
            left, right = right, left ^ (mix64(right ^ k) & low)
        x[walking] = (left << half) | right
        walking = x >= np.uint64(n)
    return x.astype(np.int64)


# --- the sampler ----------------------------------------------------------------------------
def draw_probabilities(store, weights=None) -> np.ndarray:
    """(sources,) float64: the chance that a draw picks each source, p ∝ weight / mean document
    length (weights: token shares; default the store's manifest)."""
    w = np.asarray(store.weights if weights is None else weights, dtype=np.float64)
    if w.shape != (len(store.sources),) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"mixture weights {list(w)}: need {len(store.sources)} non-negative numbers, not all zero")
    entries = store.manifest["sources"]
    mean_len = np.array([e["tokens"] / e["samples"] for e in entries])
    p = w / mean_len
    return p / p.sum()


class PackedSampler:
    """Rows of `seq_len` tokens from a TokenStore, in the global order described above."""

    def __init__(self, store, seq_len: int, seed: int = 0, window: int = 1024, pad_id: int = 0, weights=None):
        if seq_len < 1 or window < 1:
            raise ConfigError(f"sampler: seq_len ({seq_len}) and window ({window}) must be positive")
        self.store, self.seq_len, self.seed, self.window, self.pad_id = store, seq_len, seed, window, pad_id
        self.probs = draw_probabilities(store, weights)
        self._draws, self._source_draws = 0, [0] * len(store.sources)  # at the current window's start
        self._taken, self._rows = 0, 0  # rows of the current window taken; rows taken in all
        self._plan: list[list[Piece]] | None = None  # the current window's rows
        self._counts: list[int] = []  # the current window's draws per source

    # the plan, from lengths only
    def _sources(self, first: int, count: int) -> np.ndarray:
        """(count,) int64: the source of draws first, ..., first + count - 1."""
        u = uniforms(key_of(self.seed, "source"), np.arange(first, first + count))
        return np.minimum(np.searchsorted(np.cumsum(self.probs), u, side="right"), len(self.probs) - 1)

    def _docs(self, s: int, first: int, count: int) -> np.ndarray:
        """(count,) int64: the documents of source s's draws first, ..., first + count - 1."""
        n = self.store.sources[s].n_docs
        k = np.arange(first, first + count)
        epoch, pos, docs = k // n, k % n, np.empty(count, dtype=np.int64)
        for e in np.unique(epoch):
            at = epoch == e
            docs[at] = permute(pos[at], n, key_of(self.seed, "epoch", s, int(e)))
        return docs

    def window_docs(self) -> tuple[list[tuple[int, int, int]], list[int]]:
        """The current window's (source, doc, length) in draw order, and its draws per source."""
        src = self._sources(self._draws, self.window)
        docs, lengths, counts = np.empty(self.window, np.int64), np.empty(self.window, np.int64), []
        for s, first in enumerate(self._source_draws):
            at = np.flatnonzero(src == s)
            docs[at] = self._docs(s, first, at.size)
            lengths[at] = self.store.sources[s].lengths(docs[at])
            counts.append(at.size)
        return list(zip(src.tolist(), docs.tolist(), lengths.tolist())), counts

    def _current(self) -> list[list[Piece]]:
        """The current window's rows (planned once, kept until the window is used up)."""
        if self._plan is None:
            docs, self._counts = self.window_docs()
            self._plan = first_fit(docs, self.seq_len)
        return self._plan

    def _next_window(self) -> None:
        self._draws += self.window
        self._source_draws = [a + b for a, b in zip(self._source_draws, self._counts)]
        self._taken, self._plan = 0, None

    def take(self, n: int) -> list[list[Piece]]:
        """The next n global rows' pieces (every process takes the same)."""
        rows: list[list[Piece]] = []
        while len(rows) < n:
            plan = self._current()
            got = plan[self._taken : self._taken + n - len(rows)]
            rows += got
            self._taken += len(got)
            self._rows += len(got)
            if self._taken == len(plan):
                self._next_window()
        return rows

    def next_rows(self, batch_size: int, rank: int = 0, world: int = 1) -> Rows:
        """The next step: `batch_size` global rows are taken; this process's share, read from the
        store, (batch_size / world, seq_len) each."""
        if batch_size % world:
            raise ConfigError(f"batch_size {batch_size} must be a multiple of the {world} processes")
        mine = self.take(batch_size)[rank * batch_size // world : (rank + 1) * batch_size // world]
        return assemble(mine, self.store, self.seq_len, self.pad_id)

    # resume
    def state_dict(self) -> dict:
        """The position in the row stream, JSON-able."""
        return {"kind": STATE_KIND, "version": STATE_VERSION, "store": self.store.fingerprint, "seed": self.seed,
                "seq_len": self.seq_len, "window": self.window, "probs": self.probs.tolist(),
                "draws": self._draws, "source_draws": list(self._source_draws), "taken": self._taken,
                "rows": self._rows}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken; it must come from a sampler over the same store and settings."""
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND or state.get("version") != STATE_VERSION:
            raise ConfigError(f"sampler state: not a {STATE_KIND} version {STATE_VERSION} state")
        mine = self.state_dict()
        for key in ("store", "seed", "seq_len", "window", "probs"):
            if state.get(key) != mine[key]:
                raise ConfigError(f"sampler state: saved with {key} {state.get(key)!r}, this run has {mine[key]!r}; "
                                  "resume with the same store and data settings")
        self._draws, self._source_draws = int(state["draws"]), [int(c) for c in state["source_draws"]]
        self._taken, self._rows, self._plan = int(state["taken"]), int(state["rows"]), None
