"""Per-rank steady-state memory of elastify: FSDP2 over 2 processes ÷ 1 process, and the planner ÷
measured, on a random 111M-parameter Nemotron-H parent (22 blocks; embeddings + head are 23% of it)
on CPU with gloo. One run prints both ratios.

    .venv/bin/python benchmarks/bench_fsdp_memory.py [--out /tmp/bench_fsdp]

Each configuration runs the real recipe (`train`) in fresh processes. A sampler thread reads the
resident size every 20 ms; "steady" is the peak between the engine being ready (the untrained run
folder written) and the first checkpoint save (i.e. over the training steps), minus the resident
size before `train` started; "loading" the peak before that (see bench_meta_load.py).
Large tensors are served by mmap (fixed 64 KiB threshold) so freed memory leaves the process.
Goals: 2-process ÷ 1-process ≤ 0.6; plan ÷ measured within 0.75–1.25.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PARENT = dict(vocab_size=16384, hidden_size=768, pattern="M-M-M-M*M-M-M-M-M*M-M-", num_attention_heads=12,
              num_key_value_heads=4, head_dim=64, intermediate_size=3072, mamba_num_heads=24, mamba_head_dim=64,
              ssm_state_size=64, n_groups=1, chunk_size=64, n_routed_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=256, moe_shared_expert_intermediate_size=256)
RUN = dict(data="synthetic", overwrite=True, steps=3, batch_size=4, stage1_seq_len=256, stage2_seq_len=256,
           n_synthetic=200, calibration_batches=2, calibration_seq_len=64, router_fit_steps=20, checkpoint_every=1000, kd_chunk_tokens=256, optimizer="adamw")


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(cfg: dict, result: Path) -> None:
    """Run train() with an RSS sampler; write this rank's growth and the plan as JSON."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)
    import star_elastic.train.elastify as recipe
    from star_elastic.config import from_dict

    window = {"on": False, "peak": 0, "done": False, "load_peak": 0, "loading": True}
    real_save = recipe.save_checkpoint

    def save(*args, **kwargs):  # the first save ends the training window
        window["on"], window["done"] = False, True
        return real_save(*args, **kwargs)

    def sample():
        while not window["done"]:
            if window["on"]:
                window["peak"] = max(window["peak"], _rss())
            if window["loading"]:
                window["load_peak"] = max(window["load_peak"], _rss())
            time.sleep(0.02)

    def log(msg):
        if msg.startswith("engine:"):  # the untrained run folder is written: training starts
            window["on"], window["loading"] = True, False

    real_untrained = recipe.save_untrained

    def untrained(*args, **kwargs):  # loading, importance and sharding are done; this gathers on rank 0
        window["loading"] = False
        return real_untrained(*args, **kwargs)

    recipe.save_untrained = untrained

    recipe.save_checkpoint = save
    plans = []
    real_check = recipe.check_plan
    recipe.check_plan = lambda pc, doing, lg: plans.append(real_check(pc, doing, lambda m: None)) or plans[-1]
    base = _rss()
    threading.Thread(target=sample, daemon=True).start()
    summary = recipe.train(from_dict(recipe.ElastifyConfig, cfg), log=log)
    from star_elastic.distributed import shutdown

    shutdown()
    result.joinpath(f"rank{summary['rank']}.json").write_text(json.dumps(
        {"growth": window["peak"] - base, "load_growth": window["load_peak"] - base, "plan": plans[0]["per_gpu_bytes"],
         "parts": plans[0]["parts"]}))


def make_parent(out: Path) -> Path:
    """The random 111M-parameter parent (written once)."""
    from star_elastic import HybridLM, ModelConfig, save_model
    from star_elastic.data.tokenizer import build_tokenizer

    parent = out / "parent"
    if not (parent / "config.json").is_file():
        model = HybridLM(ModelConfig(**PARENT)).init_weights(0)
        model.tokenizer = build_tokenizer()
        save_model(model, parent)
    return parent


def run(config: dict, procs: int, result: Path) -> list[dict]:
    result.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [__file__, "--worker", json.dumps(config), str(result)]
    if procs == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", "29731"] + args
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return [json.loads((result / f"rank{r}.json").read_text()) for r in range(procs)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench_fsdp")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), Path(args.worker[1]))
        return
    import torch

    from star_elastic import HybridLM, ModelConfig

    out = Path(args.out)
    parent = make_parent(out)
    n_params = sum(t.numel() for t in HybridLM(ModelConfig(**PARENT)).to("meta").parameters())
    del torch
    one = run(RUN | {"model": str(parent), "out": str(out / "run1"), "parallel": "none"}, 1, out / "r1")
    two = run(RUN | {"model": str(parent), "out": str(out / "run2"), "parallel": "fsdp"}, 2, out / "r2")
    gib = 2**30
    per_rank_two = max(r["growth"] for r in two)
    print(json.dumps({
        "params": n_params,
        "one_process_GiB": round(one[0]["growth"] / gib, 3),
        "two_processes_per_rank_GiB": [round(r["growth"] / gib, 3) for r in two],
        "ratio_two_over_one": round(per_rank_two / one[0]["growth"], 3),
        "plan_one_GiB": round(one[0]["plan"] / gib, 3),
        "plan_two_per_rank_GiB": round(two[0]["plan"] / gib, 3),
        "plan_over_measured_one": round(one[0]["plan"] / one[0]["growth"], 3),
        "plan_over_measured_two": round(two[0]["plan"] / per_rank_two, 3),
        "plan_parts_two_GiB": {k: round(v / gib, 3) for k, v in two[0]["parts"].items()},
    }, indent=2))


if __name__ == "__main__":
    main()
