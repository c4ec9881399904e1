"""Peak resident memory of `slice CKPT --arch` on a multi-shard checkpoint of ≥ 1 GB.

    .venv/bin/python benchmarks/bench_slice_streaming.py [--gb 1.2] [--shard-mb 256] [--dir /tmp/slice_bench]

Builds a random BF16 nemotron_h checkpoint shard by shard (the builder holds one shard at a time,
never the model), then slices it in a child process and reads the child's peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`). A second child that only imports torch and
star_elastic gives the interpreter baseline, measured the same way. Printed: (peak − baseline) ÷
checkpoint size and ÷ largest input shard. A slicer that loaded the model would show ≥ 1.0 of the
checkpoint; the streaming one stays near one input shard + one output shard.
The parent process imports neither torch nor star_elastic and builds the checkpoint in a child
too: Linux carries a process's RSS high-water mark into the children it forks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# A Nemotron-H-like hybrid, scaled so that expert weights dominate as in Nano-30B
BASE = dict(vocab_size=32768, hidden_size=1024, num_attention_heads=16, num_key_value_heads=2, head_dim=64,
            intermediate_size=2048, mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=64, n_groups=4,
            n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
            moe_shared_expert_intermediate_size=1024)
ARCH = "hidden=768,attn_heads=4,mamba_heads=6,experts=24,expert_inter=384,shared_inter=768"

CHILD = """
import resource, sys, json
import torch, star_elastic.slicing as s
from star_elastic.elastic.arch import parse_arch
from star_elastic.config import ModelConfig
sys.path.insert(0, sys.argv[-1])
if sys.argv[1] == "slice":
    src, out, arch, shard = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    s.slice_checkpoint(src, parse_arch(arch, ModelConfig.from_json(src + "/config.json")), out, shard)
elif sys.argv[1] == "build":
    from bench_slice_streaming import build
    build(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
print(json.dumps({"maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build(path: str, gb: float, shard_bytes: int) -> None:
    """Random BF16 checkpoint of ≥ `gb` GB written shard by shard (one shard held at a time)."""
    import torch

    from star_elastic.config import ModelConfig
    from star_elastic.hf import ShardWriter, expected_disk_shapes, write_config

    def nbytes(pattern: str) -> int:
        return sum(torch.Size(s).numel() * 2 for s, _ in expected_disk_shapes(ModelConfig(**BASE, pattern=pattern)).values())

    units = 1
    while nbytes("MEM*E" * units) < gb * 1e9:
        units += 1
    cfg = ModelConfig(**BASE, pattern="MEM*E" * units)
    path = Path(path)
    path.mkdir(parents=True)
    writer = ShardWriter(path, shard_bytes)
    g = torch.Generator().manual_seed(0)
    for key, (shape, _) in expected_disk_shapes(cfg).items():
        writer.add(key, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    writer.close()
    write_config(cfg, path, torch.bfloat16)


def child(*args: str) -> int:
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", CHILD, *args, here], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.2)
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--dir", default="/tmp/star_elastic_slice_bench")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    root.mkdir(parents=True)
    child("build", str(root / "ckpt"), str(args.gb), str(args.shard_mb << 20))
    layers = len(json.loads((root / "ckpt" / "config.json").read_text())["layers_block_type"])
    shards = sorted((root / "ckpt").glob("*.safetensors"))
    size, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
    print(f"checkpoint: {layers} layers, {len(shards)} shards, {size / 1e9:.2f} GB "
          f"(largest shard {largest / 1e6:.0f} MB), built in {time.perf_counter() - t0:.0f} s")
    base = child("baseline")
    t0 = time.perf_counter()
    peak = child("slice", str(root / "ckpt"), str(root / "out"), ARCH, str(args.shard_mb << 20))
    wall = time.perf_counter() - t0
    out_size = sum(p.stat().st_size for p in (root / "out").glob("*.safetensors"))
    extra = peak - base
    print(f"slice --arch {ARCH}: {out_size / 1e9:.2f} GB written in {wall:.1f} s")
    print(f"peak RSS {peak / 1e6:.0f} MB, baseline (python + torch + star_elastic) {base / 1e6:.0f} MB, "
          f"slicing adds {extra / 1e6:.0f} MB")
    print(f"added RSS / checkpoint size = {extra / size:.3f};  / largest input shard = {extra / largest:.2f};  "
          f"/ (input shard + output shard) = {extra / (largest + (args.shard_mb << 20)):.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
