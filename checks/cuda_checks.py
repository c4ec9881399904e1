"""The checks of `make gpu-check`, one table row each; checks/gpu_check.py starts this in its venv.

    python checks/cuda_checks.py [--work DIR] [--smoke]

  cuda tests          the suite's tests marked `cuda` (pytest -m cuda): all pass, at least one runs
  elastify            a random Nemotron-H with Nano-3's 52-layer pattern and ~1.3B parameters (Nano-3's
                      widths scaled down, `nano3_like`), 4 steps of `star-elastic elastify --parallel fsdp
                      --dtype bf16` under torchrun on every visible GPU: tokens/s of the last step, each
                      rank's peak torch.cuda.max_memory_allocated against `star-elastic plan`'s estimate for
                      the same settings (the peak within PLAN_RANGE times the plan)
  grouped experts     one MoE layer of Nano-3's sizes in bf16, forward + backward, grouped GEMM against the
                      per-expert loop (benchmarks/bench_moe_grouped.py): relative difference at most
                      GROUPED_REL_DIFF, and the grouped path the faster
  server              the run served on CUDA (make_local_app, its engine process): chat requests over mixed
                      think / answer budgets sent at once, each answer equal to the same request sent alone
  slice + reload      `star-elastic slice RUN --budget 0.5`, loaded by transformers' AutoModelForCausalLM and
                      by star_elastic.hf.load_model, fp32 on CUDA: logits within SLICE_LOGITS_ATOL

--smoke runs the same checks on the CPU with a tiny model of the same pattern, to work on this file
without a GPU (the cuda-tests row is left out; the figures mean nothing). Every `star-elastic`
command line is spelled in the "command lines" block below, and nowhere else.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from gpu_check import REPO, Row, exit_status, render, run_checks  # this folder
from star_elastic import HybridLM, ModelConfig, load_model
from star_elastic.accounting import format_count
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.elastic.run import load_elastic
from star_elastic.hf import save_model
from star_elastic.infer.budget import ElasticServer
from star_elastic.serve.app import BackgroundServer, ServeConfig, make_local_app

HERE = Path(__file__).resolve().parent

# Nemotron-3 Nano 30B-A3B (NVIDIA's config.json) less its widths: the layer pattern, expert routing,
# head and state sizes, vocabulary. With NANO3_WIDTHS it is Nano-3 itself (tests/test_gpu_check.py).
NANO3 = dict(vocab_size=131072, pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", num_key_value_heads=2,
             head_dim=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
             n_routed_experts=128, num_experts_per_tok=6, routed_scaling_factor=2.5, norm_topk_prob=True)
NANO3_WIDTHS = dict(hidden_size=2688, mamba_num_heads=64, num_attention_heads=32, intermediate_size=1856,
                    moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712)
# hidden / 2.6, Mamba and attention heads / 2, expert widths / 14.5: 1.28B parameters, 0.54B active
SCALED_WIDTHS = dict(hidden_size=1024, mamba_num_heads=32, num_attention_heads=16, intermediate_size=128,
                     moe_intermediate_size=128, moe_shared_expert_intermediate_size=256)
TINY_WIDTHS = dict(vocab_size=512, hidden_size=64, mamba_num_heads=4, mamba_head_dim=16, num_attention_heads=4,
                   head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=16, intermediate_size=32,
                   n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                   moe_shared_expert_intermediate_size=32)

PLAN_RANGE = (0.5, 1.15)
"""Accepted measured peak ÷ plan: the plan may not under-estimate by more than 15 % (it refuses runs
that would not fit) nor over-estimate by more than 2x (it would refuse runs that fit)."""
GROUPED_REL_DIFF = 1e-2
"""bf16 outputs of two GEMM orders: each element rounded once more or less, 2^-8 relative at most."""
SLICE_LOGITS_ATOL = 2e-3
"""fp32, TF32 off; the suite's CPU parity holds 1e-4 on tiny models, a 52-layer 1B model sums more."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the checks run: on CUDA at Nano-3-like scale, or tiny on the CPU (--smoke)."""

    device: str
    gpus: int
    """torchrun processes of the elastify step (every visible GPU)."""
    widths: dict
    """ModelConfig fields over NANO3 for the random parent."""
    seq_len: int
    rows_per_gpu: int
    """Sequences per GPU per step."""
    micro_batch: int
    """Sequences per forward (gradient accumulation over rows_per_gpu / micro_batch)."""
    moe: dict
    """benchmarks/bench_moe_grouped.py sizes."""
    steps: int = 4
    """Two stage-1 steps (half the sequence length), then two of stage 2; tokens/s from the last."""
    budgets: tuple[float, ...] = (1.0, 0.5)


def settings(smoke: bool, gpus: int) -> Settings:
    if smoke:
        return Settings(device="cpu", gpus=1, widths=TINY_WIDTHS, seq_len=64, rows_per_gpu=2, micro_batch=1,
                        moe=dict(tokens=256, hidden=64, experts=8, top_k=2, inter=32))
    return Settings(device="cuda", gpus=gpus, widths=SCALED_WIDTHS, seq_len=2048, rows_per_gpu=4, micro_batch=2,
                    moe=dict(tokens=4096, hidden=NANO3_WIDTHS["hidden_size"], experts=NANO3["n_routed_experts"],
                             top_k=NANO3["num_experts_per_tok"], inter=NANO3_WIDTHS["moe_intermediate_size"]))


def nano3_like(widths: dict = SCALED_WIDTHS) -> ModelConfig:
    """Nano-3's layer pattern, routing and head sizes with the given widths."""
    return ModelConfig(**(NANO3 | widths))


# --- command lines -------------------------------------------------------------------------------------


def plan_args(parent: Path, s: Settings) -> list[str]:
    """`star-elastic plan` for the settings `elastify_args` trains with (the plan elastify checks itself)."""
    return ["plan", str(parent), "--gpus", str(s.gpus), "--seq-len", str(s.seq_len), "--batch-size",
            str(s.rows_per_gpu * s.gpus), "--micro-batch-size", str(s.micro_batch), "--parallel", "fsdp",
            "--dtype", "bf16", "--json"]


def elastify_args(parent: Path, data: Path, run: Path, s: Settings) -> list[str]:
    return ["elastify", "--model", str(parent), "--data", str(data), "--out", str(run),
            "--budgets", ",".join(map(str, s.budgets)), "--steps", str(s.steps),
            "--stage1-seq-len", str(s.seq_len // 2), "--stage2-seq-len", str(s.seq_len),
            "--batch-size", str(s.rows_per_gpu * s.gpus), "--micro-batch-size", str(s.micro_batch),
            "--parallel", "fsdp", "--dtype", "bf16"]


def slice_args(run: Path, budget: float, out: Path) -> list[str]:
    return ["slice", str(run), "--budget", str(budget), "--out", str(out), "--json"]


def star_elastic(args: list[str], timeout: float) -> str:
    """Standard output of `python -m star_elastic.cli ARGS` (its log goes to ours); raises on failure."""
    done = subprocess.run([sys.executable, "-m", "star_elastic.cli", *args], stdout=subprocess.PIPE, text=True,
                          timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"star-elastic {args[0]} exited {done.returncode}")
    return done.stdout


# --- the checks ----------------------------------------------------------------------------------------


def check_cuda_tests() -> Row:
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-q", "-rs", "-p", "no:cacheprovider"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    print(done.stdout, file=sys.stderr)
    counts = pytest_counts(done.stdout)
    figures = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary line"
    ok = done.returncode == 0 and counts.get("passed", 0) > 0
    return Row("cuda tests", ok, figures, "" if ok else f"pytest exited {done.returncode}")


def pytest_counts(output: str) -> dict[str, int]:
    """{"passed": 3, "skipped": 1, ...} from pytest's last summary line."""
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error|deselected)", ln)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def write_parent(cfg: ModelConfig, path: Path, seed: int = 0) -> int:
    """A random bf16 checkpoint of `cfg` (HybridLM.init_weights) at `path`; returns its parameter count."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    model.to_empty(device="cpu")
    for b in model.buffers():  # the router's correction bias: zero, as a fresh model holds it
        b.zero_()
    model.init_weights(seed).to(torch.bfloat16)
    save_model(model, path, max_shard_bytes=2 << 30)
    return model.num_parameters()


def write_token_rows(path: Path, vocab: int, seq_len: int, rows: int, seed: int = 0) -> None:
    """Pre-tokenized rows of exactly `seq_len` random ids (no padding: every step's tokens are known)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq_len), generator=g)  # above pad / bos / eos
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids.tolist()))


def check_elastify(s: Settings, work: Path) -> Row:
    cfg = nano3_like(s.widths)
    parent, data, run, peaks = work / "parent", work / "rows.jsonl", work / "run", work / "peaks"
    params = write_parent(cfg, parent)
    write_token_rows(data, cfg.vocab_size, s.seq_len, rows=16 * s.rows_per_gpu * s.gpus)
    planned = json.loads(star_elastic(plan_args(parent, s), timeout=120))["per_gpu_bytes"]
    peaks.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(s.gpus),
           str(HERE / "elastify_worker.py"), str(peaks), *elastify_args(parent, data, run, s)]
    with open(work / "elastify.out", "w") as out:  # rank 0 prints the architectures; the log goes to ours
        code = subprocess.run(cmd, cwd=REPO, stdout=out, timeout=420).returncode
    steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
    if code or len(steps) != s.steps:
        return Row("elastify", False, why=f"torchrun exited {code}, {len(steps)} of {s.steps} steps logged")
    tokens_per_s = s.rows_per_gpu * s.gpus * s.seq_len / (steps[-1]["seconds"] - steps[-2]["seconds"])
    figures = (f"{s.gpus} GPU(s), {format_count(params)} params, {s.rows_per_gpu}x{s.seq_len} tokens/GPU: "
               f"{tokens_per_s:,.0f} tokens/s; plan {planned / 2**30:.2f} GiB/GPU")
    why = [] if all(math.isfinite(r["loss"]) for r in steps) else ["a loss is not finite"]
    if s.device == "cuda":
        peak = max(json.loads(p.read_text())["peak_bytes"] for p in peaks.glob("peak_rank*.json"))
        ratio = peak / planned
        figures += f", peak {peak / 2**30:.2f} GiB"
        figures += f" (peak/plan {ratio:.2f})"
        if not PLAN_RANGE[0] <= ratio <= PLAN_RANGE[1]:
            why.append(f"peak/plan {ratio:.2f} outside {PLAN_RANGE[0]}..{PLAN_RANGE[1]}")
    return Row("elastify", not why, figures, "; ".join(why))


def check_grouped_experts(s: Settings) -> Row:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in s.moe.items()]
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_moe_grouped.py"), "--device", s.device,
                           "--dtype", "bf16", *flags], stdout=subprocess.PIPE, text=True, timeout=300, check=True)
    r = json.loads(done.stdout)
    figures = (f"{r['tokens']} tokens, {r['experts']} experts top-{r['top_k']}: grouped {r['grouped_s'] * 1e3:.1f} ms, "
               f"loop {r['loop_s'] * 1e3:.1f} ms (x{r['ratio_grouped_over_loop']:.2f}); rel diff {r['rel_diff']:.1e}")
    why = [] if r["grouped_used"] else ["the grouped GEMM does not run here (needs sm90+)"]
    why += [] if r["rel_diff"] <= GROUPED_REL_DIFF else [f"rel diff above {GROUPED_REL_DIFF:g}"]
    why += [] if r["ratio_grouped_over_loop"] < 1 else ["grouped not faster than the loop"]
    return Row("grouped experts", not why, figures, "; ".join(why))


def wide_tokenizer(vocab: int):
    """The demo tokenizer with filler tokens up to `vocab`, so that every id a random model emits decodes."""
    tok = build_tokenizer()
    tok.add_tokens([f"<t{i}>" for i in range(len(tok), vocab)])
    return tok


def ask(url: str, case: tuple[str, float, float], cap: int = 8, n: int = 8) -> tuple:
    """One greedy chat request: (status, reasoning, answer, reasoning tokens, completion tokens)."""
    msg, think, answer = case
    body = {"model": "gpu-check", "messages": [{"role": "user", "content": msg}], "temperature": 0, "max_tokens": n,
            "max_think_tokens": cap, "think_budget": think, "answer_budget": answer, "skip_special_tokens": False}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    if r.status_code != 200:
        return r.status_code, r.text
    out = r.json()
    message, usage = out["choices"][0]["message"], out["usage"]
    return (200, message["reasoning_content"], message["content"], usage["completion_tokens_details"]["reasoning_tokens"],
            usage["completion_tokens"])


def check_server(s: Settings, work: Path) -> Row:
    elastic = load_elastic(work / "run", device=s.device)
    elastic.model.tokenizer = wide_tokenizer(elastic.config.vocab_size)
    app = make_local_app(ElasticServer.from_elastic(elastic), ServeConfig(name="gpu-check"))
    budgets = [(t, a) for t in s.budgets for a in s.budgets]
    cases = [(f"{i}+{i * 7 % 10}=", *budgets[i % len(budgets)]) for i in range(8)]
    t0 = time.perf_counter()
    with BackgroundServer(app) as bg:
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            together = list(pool.map(lambda c: ask(bg.url, c), cases))
        seconds = time.perf_counter() - t0
        alone = [ask(bg.url, c) for c in cases]
    answered = sum(r[0] == 200 for r in together)
    same = sum(a == b for a, b in zip(together, alone))
    tokens = sum(r[-1] for r in together if r[0] == 200)
    figures = (f"{len(cases)} chats over think x answer budgets {budgets}: {answered} answered at once "
               f"({tokens} tokens in {seconds:.1f} s), == alone on {same}")
    ok = answered == same == len(cases)
    bad = [f"{c}: {a} vs {b}" for c, a, b in zip(cases, together, alone) if a != b]
    return Row("server", ok, figures, "" if ok else "; ".join(bad)[:300])


def check_slice(s: Settings, work: Path, budget: float = 0.5) -> Row:
    from transformers import AutoModelForCausalLM

    out = work / f"slice-{budget:g}"
    result = json.loads(star_elastic(slice_args(work / "run", budget, out), timeout=300))
    ours = load_model(out, dtype=torch.float32, device=s.device).eval()
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(s.device).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(s.device)
    with torch.no_grad():
        diff = float((ours(ids) - theirs(input_ids=ids).logits.float()).abs().max())
    figures = (f"budget {budget:g}: {format_count(result['active_params'])} active of {format_count(result['total_params'])}; "
               f"transformers vs star_elastic logits max |diff| {diff:.1e}")
    ok = diff <= SLICE_LOGITS_ATOL
    return Row("slice + reload", ok, figures, "" if ok else f"above {SLICE_LOGITS_ATOL:g}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "gpu_check_out", help="replaced each run")
    ap.add_argument("--smoke", action="store_true", help="the same checks on the CPU, tiny (no GPU needed)")
    a = ap.parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        why = "torch.cuda.is_available() is False"
        if "+cpu" in torch.__version__:
            why += "; this is a CPU build of torch: rebuild the venv with TORCH_INDEX_URL set to an index of CUDA builds"
        rows = [Row("torch sees CUDA", False, f"torch {torch.__version__}", why)]
        print(render(rows))
        return exit_status(rows)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 comparisons are fp32
    s = settings(a.smoke, torch.cuda.device_count())
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    t0 = time.perf_counter()
    checks = [("cuda tests", check_cuda_tests)] if not a.smoke else []
    checks += [("elastify", lambda: check_elastify(s, a.work)), ("grouped experts", lambda: check_grouped_experts(s)),
               ("server", lambda: check_server(s, a.work)), ("slice + reload", lambda: check_slice(s, a.work))]
    rows = run_checks(checks, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render(rows))
    print(f"({time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name() if s.device == 'cuda' else 'CPU'}; "
          f"files in {a.work})")
    return exit_status(rows)


if __name__ == "__main__":  # the server's engine is a spawned process
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
