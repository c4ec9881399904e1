"""Time per real token of an elastify step: packed rows (the token store's sampler) ÷ padded batches
(the old path: one document per row, cut at seq_len, the batch padded to its longest row).

    .venv/bin/python benchmarks/bench_packed_step.py [--steps 12] [--batch 8] [--seq-len 512] [--threads 2]

Same model (the demo parent's architecture, budget 0.75 through the router, chunked KD from the
frozen teacher, AdamW) and the same data: a store of random-id documents whose lengths follow
bench_packing.py's reasoning-SFT log-normal scaled to CPU (median 150 tokens, σ 1.0, clipped to
[8, 2048]; seq_len 512). Packed: `PackedSampler.next_rows(batch)`, teacher and student with
`seq_idx`. Padded: `batch` documents drawn with replacement per step (as the old `batch_for_step`),
no seq_idx. Steps alternate so machine noise hits both alike; medians of time per real token.
Goal (issue 24): packed ÷ padded ≤ (padded efficiency ÷ packed efficiency) × 1.1.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from star_elastic import HybridLM, ModelConfig
from star_elastic.config import ElasticConfig
from star_elastic.data.packing import Rows
from star_elastic.data.sampler import PackedSampler
from star_elastic.data.store import TokenStore, write_store
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.distributed import EngineConfig, parallelize
from star_elastic.elastic.router import router_loss
from star_elastic.elastic.run import build_elastic
from star_elastic.runtime import tune_cpu_allocator
from star_elastic.train.distill import DistillStep
from star_elastic.train.elastify import kd_positions
from star_elastic.train.parent import DEFAULT_PARENT


def lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(150), 1.0, n)), 8, 2048).astype(np.int64)


def make_store(path: Path, lens: np.ndarray, vocab: int) -> TokenStore:
    rng = np.random.default_rng(1)

    def items():
        for i, n in enumerate(lens):
            yield 0, f"generated:{i + 1}", [(rng.integers(3, vocab, n, dtype=np.uint32), np.ones(n, dtype=bool))]

    write_store(path, items(), [("generated", [], None)], None, {"vocab_size": vocab})
    return TokenStore.open(path)


def padded_rows(store: TokenStore, rng: np.random.Generator, batch: int, seq_len: int) -> Rows:
    """The old batching: `batch` documents with replacement, each cut at seq_len, padded to the longest."""
    src = store.sources[0]
    docs = [src.tokens(int(d)) for d in rng.integers(0, src.n_docs, batch)]
    width = min(seq_len, max(len(ids) for ids, _ in docs))
    ids, mask, real = (torch.zeros(batch, width, dtype=torch.long) for _ in range(3))
    for r, (tok, loss) in enumerate(docs):
        n = min(width, len(tok))
        ids[r, :n], mask[r, 1:n], real[r, :n] = torch.from_numpy(tok[:n].astype(np.int64)), 1, 1
    return Rows(ids, mask, torch.zeros_like(ids), real)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    cfg = ModelConfig(**(DEFAULT_PARENT | {"max_position_embeddings": args.seq_len}), vocab_size=len(tok))
    student = HybridLM(cfg).init_weights(0)
    teacher = HybridLM(cfg).init_weights(1).eval().requires_grad_(False)
    elastic = build_elastic(student, ElasticConfig(), None, None)
    engine = parallelize(DistillStep(elastic, 1024), teacher, "none", 0, 1, EngineConfig())
    opt = torch.optim.AdamW(list(student.parameters()) + list(elastic.router.parameters()), lr=1e-4)

    def step(rows: Rows, packed: bool) -> float:
        seq_idx = rows.seq_idx if packed else None
        t0 = time.perf_counter()
        with torch.no_grad():
            hidden = engine.teacher(rows.ids, head=False, seq_idx=seq_idx)
        kl, _, picks = engine.student(rows.ids, 0.75, 0.5, torch.Generator().manual_seed(0), hidden,
                                      engine.teacher.lm_head, kd_positions(rows.mask), seq_idx=seq_idx)
        loss = kl / rows.mask.sum().clamp_min(1) + router_loss(elastic.cost, picks, 0.75).float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", lengths(20000), len(tok))
        sampler, rng = PackedSampler(store, args.seq_len, seed=0), np.random.default_rng(0)
        per_token = {"packed": [], "padded": []}
        counts = {k: [0, 0] for k in per_token}  # real, computed tokens
        for i in range(args.steps + 2):  # 2 warm-up steps each
            for name in ("packed", "padded"):
                rows = sampler.next_rows(args.batch) if name == "packed" else padded_rows(store, rng, args.batch,
                                                                                           args.seq_len)
                seconds, real = step(rows, name == "packed"), int(rows.real.sum())
                if i >= 2:
                    per_token[name].append(seconds / real)
                    counts[name][0] += real
                    counts[name][1] += rows.ids.numel()
    eff = {k: real / computed for k, (real, computed) in counts.items()}
    med = {k: statistics.median(v) for k, v in per_token.items()}
    ratio, goal = med["packed"] / med["padded"], eff["padded"] / eff["packed"] * 1.1
    print(f"{args.steps} steps each, batch {args.batch}, seq_len {args.seq_len}, {torch.get_num_threads()} threads, "
          f"{student.num_parameters():,} params, budget 0.75")
    for k in ("padded", "packed"):
        print(f"  {k}: {med[k] * 1e6:8.1f} µs per real token, efficiency (real ÷ computed tokens) {eff[k]:.3f}, "
              f"{counts[k][0] / args.steps:7.0f} real tokens per step")
    print(f"  time per real token packed ÷ padded: {ratio:.3f}   goal ≤ {goal:.3f} "
          f"(= padded ÷ packed efficiency {eff['padded'] / eff['packed']:.3f} × 1.1): "
          f"{'met' if ratio <= goal else 'NOT met'}")


if __name__ == "__main__":
    main()
