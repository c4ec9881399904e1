"""Packing and the sampler against the documents themselves: every token of the store carries its
(document, position) in its id, so rows are checked by decoding them; processes against one
process, resumed against uninterrupted, mixture counts against a binomial bound."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from star_elastic.config import ConfigError
from star_elastic.data.packing import first_fit
from star_elastic.data.sampler import PackedSampler, permute
from star_elastic.data.store import PrepareConfig, TokenStore, prepare_data

ID = 1000  # token id = ID * (document + 1) + position: every token names its document and place
PAD = 7


def lengths_store(tmp_path, name: str, lengths, weight: float | None = None, mask_seed: int = 0):
    """A one-source store of input_ids documents with the given lengths and random loss masks."""
    rng = np.random.default_rng(mask_seed)
    path = tmp_path / f"{name}.jsonl"
    with open(path, "w") as f:
        for d, n in enumerate(lengths):
            ids = (ID * (d + 1) + np.arange(n)).tolist()
            f.write(json.dumps({"input_ids": ids, "loss_mask": rng.integers(0, 2, n).tolist()}) + "\n")
    return f"{path}" + ("" if weight is None else f":{weight}")


def open_store(tmp_path, *inputs, name="st"):
    prepare_data(PrepareConfig(inputs=inputs, out=str(tmp_path / name), vocab_size=10**8, shard_tokens=500))
    return TokenStore.open(tmp_path / name)


@pytest.fixture
def store(tmp_path):
    lengths = np.random.default_rng(0).integers(1, 150, 120)  # seq_len 64 below: a third are split
    return open_store(tmp_path, lengths_store(tmp_path, "a", lengths))


def segments(rows) -> list[dict]:
    """Each row's document pieces, read from the token ids alone."""
    out = []
    for r in range(rows.ids.shape[0]):
        ids, seq_idx, real = rows.ids[r], rows.seq_idx[r], rows.real[r].bool()
        assert (seq_idx.diff() >= 0).all()
        for k in seq_idx[real].unique().tolist():
            at = torch.nonzero((seq_idx == k) & real)[:, 0]
            doc, pos = ids[at] // ID - 1, ids[at] % ID
            assert (doc == doc[0]).all() and (pos.diff() == 1).all() and (at.diff() == 1).all()
            out.append({"row": r, "at": at[0].item(), "doc": doc[0].item(), "pos": pos.tolist(), "mask": rows.mask[r, at]})
        pad = ~real
        assert (rows.ids[r][pad] == PAD).all() and (rows.mask[r][pad] == 0).all()
        assert (seq_idx[pad] == (seq_idx[real].max() + 1 if real.any() else 0)).all()
    return out


def rows_until(sampler: PackedSampler, tokens: int):
    """Rows, one at a time, until they hold `tokens` real tokens."""
    taken, real = [], 0
    while real < tokens:
        taken.append(sampler.next_rows(1))
        real += int(taken[-1].real.sum())
    assert real == tokens
    return type(taken[0])(*(torch.cat([getattr(t, f) for t in taken]) for f in ("ids", "mask", "seq_idx", "real")))


def test_an_epoch_holds_every_document_once_in_order_with_correct_boundaries(store):
    src, total = store.sources[0], store.manifest["sources"][0]["tokens"]
    sampler = PackedSampler(store, seq_len=64, seed=3, window=40, pad_id=PAD)  # 3 windows = the epoch
    epochs = [segments(rows_until(sampler, total)) for _ in range(2)]
    for segs in epochs:
        by_doc = {}
        for s in segs:
            by_doc.setdefault(s["doc"], []).append(s)
        assert sorted(by_doc) == list(range(src.n_docs))
        for doc, pieces in by_doc.items():
            ids, mask = store.doc(0, doc)
            assert sum((p["pos"] for p in pieces), []) == list(range(len(ids)))  # once, in order
            assert [p["row"] for p in pieces] == list(range(pieces[0]["row"], pieces[0]["row"] + len(pieces)))
            assert all(p["at"] == 0 for p in pieces[1:]) and all(len(p["pos"]) == 64 for p in pieces[:-1])
            for p in pieces:  # the store's mask, except each piece's first token
                want = torch.from_numpy(mask[p["pos"]].astype(np.int64))
                want[0] = 0
                assert torch.equal(p["mask"], want)
    orders = [[s["doc"] for s in segs if s["pos"][0] == 0] for segs in epochs]
    assert orders[0] != orders[1]  # a new permutation per epoch


def test_first_fit_rows_are_full_up_to_what_no_later_document_fits():
    rng = np.random.default_rng(1)
    docs = [(0, d, int(n)) for d, n in enumerate(rng.integers(1, 100, 300))]
    rows = first_fit(docs, 64)
    used = [sum(p.length for p in row) for row in rows]
    assert max(used) <= 64
    for d, (_, _, n) in enumerate(docs):  # a document went to a new row only if no earlier row had room
        if n <= 64:
            [r] = [i for i, row in enumerate(rows) if any(p.doc == d for p in row)]
            before = [sum(p.length for p in row if p.doc < d) for row in rows[:r]]
            assert all(64 - u < n for u in before)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_processes_take_disjoint_rows_that_cover_the_one_process_stream(store, world):
    one = PackedSampler(store, 64, seed=1, window=32, pad_id=PAD)
    reads = [[] for _ in range(world)]
    ranks = []
    for r in range(world):
        own = TokenStore.open(store.path)
        original = own.sources[0].tokens
        own.sources[0].tokens = lambda doc, start, stop, r=r, original=original: (
            reads[r].append((doc, start)) or original(doc, start, stop))
        ranks.append(PackedSampler(own, 64, seed=1, window=32, pad_id=PAD))
    got = [[] for _ in range(world)]
    for _ in range(8):  # 48 rows: within the first epoch
        whole = one.next_rows(6)
        parts = [s.next_rows(6, r, world) for r, s in enumerate(ranks)]
        for field in ("ids", "mask", "seq_idx", "real"):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field))
        for r, part in enumerate(parts):
            got[r] += [(s["doc"], s["pos"][0]) for s in segments(part)]
    for r in range(world):
        assert sorted(reads[r]) == sorted(got[r])  # a process reads exactly its own rows' pieces
    pieces = sum(got, [])
    assert len(pieces) == len(set(pieces))  # disjoint


def test_mixture_draws_follow_the_weights_and_each_source_walks_its_epochs(tmp_path):
    store = open_store(tmp_path, lengths_store(tmp_path, "a", [10] * 500, 0.7), lengths_store(tmp_path, "b", [30] * 40, 0.3))
    sampler = PackedSampler(store, 64, seed=5, window=500, pad_id=PAD)
    docs = {0: [], 1: []}
    while sampler.state_dict()["draws"] < 8000 or sampler.state_dict()["taken"]:  # whole windows only
        rows = sampler.next_rows(1)
        for s in segments(rows):
            docs[0 if len(s["pos"]) == 10 else 1].append(s["doc"])
    n = sampler.state_dict()["draws"]
    p = (0.7 / 10) / (0.7 / 10 + 0.3 / 30)  # token shares 0.7 / 0.3 over mean lengths 10 and 30
    assert len(docs[0]) + len(docs[1]) == n
    assert abs(len(docs[0]) - n * p) <= 4.5 * np.sqrt(n * p * (1 - p))
    tokens = 10 * len(docs[0]) / (10 * len(docs[0]) + 30 * len(docs[1]))
    assert tokens == pytest.approx(0.7, abs=0.03)
    for s, size in ((0, 500), (1, 40)):  # each source's draws: permutation after permutation
        seen = docs[s]
        for e in range(len(seen) // size):
            assert sorted(seen[e * size : (e + 1) * size]) == list(range(size))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_continues_at_the_next_row_at_any_world_size(store, world):
    ref = PackedSampler(store, 64, seed=2, window=16, pad_id=PAD)
    uninterrupted = [ref.next_rows(6) for _ in range(12)]
    first = PackedSampler(store, 64, seed=2, window=16, pad_id=PAD)
    for _ in range(5):
        first.next_rows(6)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["taken"] > 0  # mid-window
    resumed = [PackedSampler(TokenStore.open(store.path), 64, seed=2, window=16, pad_id=PAD) for _ in range(world)]
    for s in resumed:
        s.load_state_dict(state)
    for step in range(5, 12):
        parts = [s.next_rows(6, r, world) for r, s in enumerate(resumed)]
        assert torch.equal(torch.cat([p.ids for p in parts]), uninterrupted[step].ids)
        assert torch.equal(torch.cat([p.seq_idx for p in parts]), uninterrupted[step].seq_idx)


def test_two_stages_sample_the_same_store_each_with_its_own_state(store):
    stage1, stage2 = PackedSampler(store, 32, pad_id=PAD), PackedSampler(store, 128, pad_id=PAD)
    assert stage1.next_rows(4).ids.shape == (4, 32) and stage2.next_rows(2).ids.shape == (2, 128)
    with pytest.raises(ConfigError, match="saved with seq_len 32, this run has 128"):
        stage2.load_state_dict(stage1.state_dict())
    with pytest.raises(ConfigError, match="batch_size 5 must be a multiple of the 2 processes"):
        stage1.next_rows(5, 0, 2)


def test_the_permutation_is_a_keyed_bijection_in_constant_memory():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        for key in (0, 1, 99):
            assert sorted(permute(np.arange(n), n, key).tolist()) == list(range(n))
    assert permute(np.arange(1000), 1000, 1).tolist() != permute(np.arange(1000), 1000, 2).tolist()
    huge = permute(np.arange(1000), 10**15, 7)  # nothing of size n is built
    assert len(set(huge.tolist())) == 1000 and huge.max() < 10**15 and huge.min() >= 0
