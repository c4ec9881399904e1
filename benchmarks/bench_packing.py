"""Packing efficiency (padded vs packed) and prepare-data throughput, side by side in one run.

    .venv/bin/python benchmarks/bench_packing.py [--docs 8000] [--seq-len 8192] [--records 1500]

1. Efficiency = real tokens ÷ computed tokens, on document lengths like reasoning SFT: log-normal,
   median 1500 tokens, σ = 1.0 (mean ≈ 2470; 99.9th percentile ≈ 33K), clipped to [32, 32768].
   Padded (the old `batch_for_step`): one document per row, cut at seq_len, each batch padded to
   its longest row; also with length-sorted micro-batches of 8 (`length_groups`). Packed: the
   sampler's rows (first fit over windows of drawn documents, long documents split) over a store of
   these lengths, for several window sizes. Machine-independent numbers.
2. prepare-data throughput, tokens per second per worker, 1 and 2 workers, on generated chat
   records (multi-turn, reasoning_content) and text records, with the demo tokenizer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from star_elastic.data.sampler import PackedSampler
from star_elastic.data.store import PrepareConfig, TokenStore, prepare_data, write_store
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.train.parent import length_groups


def reasoning_lengths(n: int, seed: int = 0) -> np.ndarray:
    """(n,) int64 document lengths: log-normal, median 1500, σ 1.0, clipped to [32, 32768]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(1500), 1.0, n)), 32, 32768).astype(np.int64)


def padded(lengths: np.ndarray, seq_len: int, batch: int, micro: int | None, seed: int = 0) -> tuple[float, float]:
    """(efficiency, share of tokens cut off) of the old padded batches (documents drawn with replacement)."""
    rng = np.random.default_rng(seed)
    real = computed = 0
    for _ in range(2000):
        picked = np.minimum(lengths[rng.integers(0, len(lengths), batch)], seq_len)
        groups = length_groups(picked.tolist(), micro)
        real += int(picked.sum())
        computed += sum(len(g) * int(picked[g].max()) for g in groups)
    total, cut = int(lengths.sum()), int(np.maximum(lengths - seq_len, 0).sum())
    return real / computed, cut / total


def length_store(path: Path, lengths: np.ndarray) -> TokenStore:
    """A one-source store of random-id documents of these lengths (written by the store's writer)."""
    rng = np.random.default_rng(1)

    def items():
        for i, n in enumerate(lengths):
            yield 0, f"generated:{i + 1}", [(rng.integers(0, 50000, n, dtype=np.uint32), np.ones(n, dtype=bool))]

    write_store(path, items(), [("generated", [], None)], None, {"vocab_size": 50000})
    return TokenStore.open(path)


def packed(store: TokenStore, seq_len: int, window: int) -> tuple[float, float]:
    """Efficiency of the sampler's rows over the first windows (plan only: lengths, no tokens read),
    and the milliseconds each window's plan took."""
    sampler = PackedSampler(store, seq_len, seed=0, window=window)
    real = rows = 0
    t0 = time.perf_counter()
    while sampler.state_dict()["draws"] < 6 * 1024 or sampler.state_dict()["taken"]:  # whole windows
        for row in sampler.take(1):
            real += sum(p.length for p in row)
            rows += 1
    ms = (time.perf_counter() - t0) * 1e3 / (sampler.state_dict()["draws"] / window)
    return real / (rows * seq_len), ms


def efficiency(n_docs: int, seq_len: int) -> None:
    lengths = reasoning_lengths(n_docs)
    print(f"packing efficiency at seq_len {seq_len}: {n_docs} documents, log-normal median "
          f"{np.median(lengths):.0f}, mean {lengths.mean():.0f}, p99 {np.percentile(lengths, 99):.0f}, "
          f"max {lengths.max()} tokens; {(lengths > seq_len).mean():.1%} longer than a row")
    for batch in (8, 64):
        for micro in (None, 8):
            if micro is not None and micro >= batch:
                continue
            eff, cut = padded(lengths, seq_len, batch, micro)
            print(f"  padded, batch {batch:2d}{'' if micro is None else f', micro-batches of {micro}':22s}: "
                  f"{eff:.3f}  (and {cut:.1%} of all tokens cut off at seq_len)")
    with tempfile.TemporaryDirectory() as tmp:
        store = length_store(Path(tmp) / "store", lengths)
        for window in (256, 1024, 4096):
            eff, ms = packed(store, seq_len, window)
            print(f"  packed, window {window:4d} documents{'':15s}: {eff:.3f}  (no token cut off: long documents "
                  f"split across rows; planning {ms:.0f} ms per window)")
        rows = PackedSampler(store, seq_len, window=1024).next_rows(64)
        print(f"  (64 rows read through the store: {rows.real.float().mean():.3f} real)")


def chat_record(rng: np.random.Generator) -> dict:
    words = lambda n: " ".join("abcdefgh"[: rng.integers(2, 8)] for _ in range(n))  # noqa: E731
    msgs = []
    for _ in range(int(rng.integers(1, 4))):
        msgs += [{"role": "user", "content": words(int(rng.integers(10, 60)))},
                 {"role": "assistant", "content": words(int(rng.integers(5, 40))),
                  "reasoning_content": words(int(rng.integers(50, 400)))}]
    return {"messages": msgs}


def throughput(n_records: int) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tokenizer().save_pretrained(tmp / "tok")
        with open(tmp / "chat.jsonl", "w") as f:
            f.writelines(json.dumps(chat_record(rng)) + "\n" for _ in range(n_records))
        with open(tmp / "text.jsonl", "w") as f:
            f.writelines(json.dumps({"text": chat_record(rng)["messages"][0]["content"] * 8}) + "\n"
                         for _ in range(n_records))
        one = tmp / "one.jsonl"
        one.write_text('{"text": "a"}\n')
        t0 = time.perf_counter()
        prepare_data(PrepareConfig(inputs=(str(one),), tokenizer=str(tmp / "tok"), out=str(tmp / "one"),
                                   workers=2))
        print(f"prepare-data throughput, demo tokenizer, {n_records} records per kind (a one-record input takes "
              f"{time.perf_counter() - t0:.1f} s with 2 workers: starting the processes):")
        for kind in ("chat", "text"):
            for workers in (1, 2):
                out = tmp / f"{kind}-{workers}"
                t0 = time.perf_counter()
                manifest = prepare_data(PrepareConfig(inputs=(str(tmp / f"{kind}.jsonl"),), tokenizer=str(tmp / "tok"),
                                                      out=str(out), workers=workers))
                seconds = time.perf_counter() - t0
                tokens = manifest["sources"][0]["tokens"]
                print(f"  {kind}, {workers} worker{'s' if workers > 1 else ' '}: {tokens} tokens in {seconds:5.1f} s, "
                      f"{tokens / seconds / workers:9.0f} tokens/s per worker ({tokens / seconds:9.0f} in all)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--records", type=int, default=1500)
    args = ap.parse_args()
    efficiency(args.docs, args.seq_len)
    throughput(args.records)


if __name__ == "__main__":
    main()
