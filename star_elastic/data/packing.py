"""Packing whole documents into rows of `seq_len` tokens, with their boundaries.

First fit (NVIDIA's `first_fit_shuffle`: the documents come already shuffled, by the sampler): each
document goes into the first row with room for it, else into a new row. A document longer than a
row is cut into pieces of `seq_len` tokens, each a new row, and its last piece starts a new row too,
so a document's pieces lie in consecutive rows, in order; later documents may fill that last row.

A row carries `seq_idx` (T,) int64: the index of the document piece each token belongs to, 0, 1, ...
(non-decreasing; the model starts every piece from a clean state). Its loss mask is the store's
(token t is a target of position t - 1), zeroed on the first token of every piece: that target
would be predicted across the boundary. Room left at the end of a row is padding (pad id, mask 0,
not real) with its own seq_idx, one past the last piece's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Piece:
    """Tokens [start, start + length) of document `doc` of source `source`."""

    source: int
    doc: int
    start: int
    length: int


@dataclasses.dataclass
class Rows:
    """Packed rows, each (R, T) int64: token ids, loss mask (0/1, target-aligned), document index
    within the row, and real (1) vs padding (0)."""

    ids: torch.Tensor
    mask: torch.Tensor
    seq_idx: torch.Tensor
    real: torch.Tensor


def first_fit(docs: Sequence[tuple[int, int, int]], seq_len: int) -> list[list[Piece]]:
    """(source, doc, length) documents, in order → rows of pieces (each row's lengths sum ≤ seq_len)."""
    rows: list[list[Piece]] = []
    bound = sum(-(-n // seq_len) for _, _, n in docs)  # rows needed if no two documents shared one
    free = np.zeros(max(bound, 1), dtype=np.int64)  # (bound,) room left per row; unused rows have 0
    for source, doc, n in docs:
        if n > seq_len:
            for start in range(0, n, seq_len):  # consecutive new rows; the last piece's row stays open
                free[len(rows)] = seq_len - min(seq_len, n - start)
                rows.append([Piece(source, doc, start, min(seq_len, n - start))])
            continue
        fits = np.flatnonzero(free[: len(rows)] >= n)
        at = int(fits[0]) if fits.size else len(rows)
        if at == len(rows):
            rows.append([])
            free[at] = seq_len
        rows[at].append(Piece(source, doc, 0, n))
        free[at] -= n
    return rows


def assemble(rows: Sequence[Sequence[Piece]], store, seq_len: int, pad_id: int) -> Rows:
    """Read the rows' tokens from `store` (a TokenStore) into tensors of (len(rows), seq_len)."""
    shape = (len(rows), seq_len)
    ids, mask = np.full(shape, pad_id, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    seq_idx, real = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for k, piece in enumerate(row):
            tok, loss = store.sources[piece.source].tokens(piece.doc, piece.start, piece.start + piece.length)
            end = pos + piece.length
            ids[r, pos:end], mask[r, pos:end], seq_idx[r, pos:end], real[r, pos:end] = tok, loss, k, 1
            mask[r, pos] = 0  # the piece's first token is no target of the previous piece's last position
            pos = end
        seq_idx[r, pos:] = len(row)  # padding: a document of its own
    return Rows(*(torch.from_numpy(a) for a in (ids, mask, seq_idx, real)))
