"""Memory independent of data size: peak RSS per process of a 2-process elastify on a store of ~500M
tokens ÷ on a store of ~5M tokens (issue 24; goal ≤ 1.10).

    .venv/bin/python benchmarks/bench_store_memory.py [--big 500000000] [--small 5000000]

Both stores are written by `star-elastic prepare-data` from parquet files of `input_ids` records
(random ids below the tiny parent's vocabulary of 512; document lengths log-normal, median 1500,
σ 1.0, clipped to [32, 32768], as bench_packing.py): the big store is 500M uint32 ids, 2 GB on disk
(plus ~0.6 GB of parquet input, deleted once the store is written; all in a temporary folder). Each
elastify runs under torchrun with 2 processes (FSDP2 on gloo), a tiny parent, 6 steps of 4 packed
rows of 512 then 1024 tokens; each process reports its `ru_maxrss` at the end (its peak resident
set, memory-mapped store pages it touched included). Also printed: prepare-data's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 512
PARENT = dict(hidden_size=32, pattern="M*E-", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=32, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
              chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
              moe_shared_expert_intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=1024)
RUN = dict(steps=6, batch_size=4, stage1_seq_len=512, stage2_seq_len=1024, calibration_batches=2,
           calibration_seq_len=512, router_fit_steps=20, checkpoint_every=3, elastic={"budgets": [1.0, 0.5]})


def write_parquet(folder: Path, tokens: int, seed: int, file_tokens: int = 20_000_000) -> int:
    """Parquet files of input_ids records (documents end to end up to `tokens`); returns the documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng, written, docs, part = np.random.default_rng(seed), 0, 0, 0
    while written < tokens:
        n = min(file_tokens, tokens - written)
        lens = np.clip(np.round(rng.lognormal(np.log(1500), 1.0, n // 600 + 2)), 32, 32768).astype(np.int64)
        lens = lens[: np.searchsorted(np.cumsum(lens), n) + 1]
        lens[-1] -= max(0, int(lens.sum()) - n)
        lens = lens[lens > 0]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        values = pa.array(rng.integers(0, VOCAB, int(offsets[-1]), dtype=np.uint16))
        table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), values)})
        pq.write_table(table, folder / f"part-{part:04d}.parquet")
        written, docs, part = written + int(offsets[-1]), docs + len(lens), part + 1
    return docs


def prepare(root: Path, name: str, tokens: int) -> Path:
    """A store of `tokens` random ids written by prepare-data; returns it and prepare-data's seconds."""
    inputs = root / f"{name}-parquet"
    docs = write_parquet(inputs, tokens, seed=len(name))
    store = root / f"{name}-store"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "star_elastic.cli", "prepare-data", str(inputs), "--vocab-size", str(VOCAB),
                    "--out", str(store)], check=True)
    seconds = time.perf_counter() - t0
    manifest = json.loads((store / "manifest.json").read_text())
    print(f"{name}: {manifest['sources'][0]['tokens']:,} tokens in {docs:,} documents, prepared in {seconds:.0f} s "
          f"({manifest['sources'][0]['tokens'] / seconds / 1e6:.2f} M tokens/s, 1 worker); "
          f"store {sum(f.stat().st_size for f in store.rglob('*') if f.is_file()) / 2**30:.2f} GiB")
    shutil.rmtree(inputs)
    return store


def elastify_peak(root: Path, parent: Path, store: Path, name: str) -> list[int]:
    """Peak RSS (bytes) of each of the 2 processes of an elastify on `store`."""
    cfg = dict(RUN, model=str(parent), data=str(store), out=str(root / f"run-{name}"))
    out = root / f"rss-{name}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    __file__, "--worker", json.dumps(cfg), str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads((out / f"rank{r}.json").read_text())["maxrss"] for r in (0, 1)]


def worker(cfg: str, out: str) -> None:
    from star_elastic.config import from_dict
    from star_elastic.distributed import shutdown
    from star_elastic.train.elastify import ElastifyConfig, train

    summary = train(from_dict(ElastifyConfig, json.loads(cfg)), log=lambda msg: None)
    shutdown()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    Path(out, f"rank{summary['rank']}.json").write_text(json.dumps({"maxrss": maxrss}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", type=int, default=500_000_000)
    ap.add_argument("--small", type=int, default=5_000_000)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    import torch

    from star_elastic import HybridLM, ModelConfig, save_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parent = root / "parent"
        save_model(HybridLM(ModelConfig(**PARENT)).init_weights(0), parent)
        stores = {name: prepare(root, name, tokens)
                  for name, tokens in (("small", args.small), ("big", args.big))}
        peaks = {name: elastify_peak(root, parent, store, name) for name, store in stores.items()}
        for name in peaks:
            print(f"elastify on the {name} store, peak RSS per process: "
                  + ", ".join(f"rank {r} {p / 2**20:.0f} MiB" for r, p in enumerate(peaks[name])))
        ratio = max(b / s for b, s in zip(peaks["big"], peaks["small"]))
        print(f"peak RSS big ÷ small (the larger of the two processes' ratios): {ratio:.3f}   goal ≤ 1.10: "
              f"{'met' if ratio <= 1.10 else 'NOT met'}  (torch {torch.__version__}, 2 processes, gloo)")


if __name__ == "__main__":
    main()
