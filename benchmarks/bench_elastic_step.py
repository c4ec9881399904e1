"""One elastic training step vs one plain distillation step of the parent, same batch, one run.

    .venv/bin/python benchmarks/bench_elastic_step.py

Both steps: frozen-teacher forward + student forward/backward + AdamW update on the demo-sized
parent, over packed rows of the built-in synthetic set (its token store; documents kept apart by
seq_idx). The elastic step adds the router's Gumbel picks, the masked forward and the router loss.
Steps alternate so machine noise hits both alike; prints medians and the ratio (goal ≤ 1.15x).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch

from star_elastic import HybridLM, ModelConfig
from star_elastic.config import ElasticConfig
from star_elastic.data.loading import open_data
from star_elastic.data.sampler import PackedSampler
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.elastic.router import router_loss
from star_elastic.elastic.run import build_elastic
from star_elastic.runtime import tune_cpu_allocator
from star_elastic.train.distill import kd_loss
from star_elastic.train.parent import DEFAULT_PARENT


def main(repeats: int = 15, batch: int = 24, seq_len: int = 128) -> None:
    tune_cpu_allocator()
    tok = build_tokenizer()
    cfg = ModelConfig(**DEFAULT_PARENT, vocab_size=len(tok))
    student = HybridLM(cfg).init_weights(0)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    elastic = build_elastic(student, ElasticConfig(), None, None)
    opt = torch.optim.AdamW(list(student.parameters()) + list(elastic.router.parameters()), lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_data("synthetic", tmp + "/store", tokenizer=tok, n_synthetic=2000)
        rows = PackedSampler(store, seq_len).next_rows(batch)
    ids, seq_idx, attn = rows.ids, rows.seq_idx, rows.real > 0

    def plain():
        with torch.no_grad():
            t = teacher(ids, seq_idx=seq_idx)
        loss = kd_loss(student(ids, seq_idx=seq_idx), t, attn)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def elastic_step(budget=0.75):
        with torch.no_grad():
            t = teacher(ids, seq_idx=seq_idx)
        logits, picks = elastic.forward_sampled(ids, budget, tau=0.5, generator=torch.Generator().manual_seed(0),
                                                seq_idx=seq_idx)
        loss = kd_loss(logits, t, attn) + router_loss(elastic.cost, picks, budget).float()
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = {"plain": [], "elastic": []}
    for fn in (plain, elastic_step):
        fn()
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("elastic", elastic_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    p, e = statistics.median(times["plain"]), statistics.median(times["elastic"])
    print(f"batch {batch} x {seq_len} tokens, {torch.get_num_threads()} threads, {student.num_parameters():,} params")
    print(f"plain distillation step {p * 1000:8.1f} ms")
    print(f"elastic step            {e * 1000:8.1f} ms")
    print(f"ratio elastic / plain   {e / p:8.3f}x")


if __name__ == "__main__":
    main()
