"""`make interop`, last part: lm-eval's multiple-choice scores through `star-elastic serve` equal those on the slice.

    python interop/lm_eval_parity.py [--work interop_out/proxy] [--out interop_out/lm_eval_mc] [--atol 1e-4]

WORK is interop/check_proxy_vllm.py's folder: `proxy-full` (a random model with the demo tokenizer),
`proxy-half` (its nested half, sliced) and `archs.json` (that half as the variant "half"). The
server serves proxy-full with the variants on the CPU (fp32); lm-eval scores the task
star_elastic_demo_mc (interop/lm_eval/) twice: `--model local-completions` at model `tiny@half`
through the server (echo + logprobs), and `--model hf` on proxy-half. Every choice's
log-likelihood must agree within ATOL nats and both runs must pick the same choices
(interop/lm_eval_loglik_check.py). Exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from check_proxy_vllm import Process, free_port  # this folder
from lm_eval_loglik_check import accuracy, compare, read_samples

HERE = Path(__file__).resolve().parent
TASK = "star_elastic_demo_mc"
LM_EVAL = [str(Path(sys.executable).parent / "lm_eval"), "--include_path", str(HERE / "lm_eval"), "--tasks", TASK,
           "--log_samples"]


def lm_eval(model: str, model_args: str, batch_size: int, out: Path) -> Path:
    """Run lm-eval; its samples file."""
    subprocess.run([*LM_EVAL, "--model", model, "--model_args", model_args, "--batch_size", str(batch_size),
                    "--output_path", str(out)], check=True, cwd=HERE.parent)
    return next(out.glob(f"*/samples_{TASK}_*.jsonl"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("interop_out/proxy"), help="interop/check_proxy_vllm.py's folder")
    ap.add_argument("--out", type=Path, default=Path("interop_out/lm_eval_mc"), help="lm-eval outputs (replaced)")
    ap.add_argument("--atol", type=float, default=1e-4, help="nats per choice")
    a = ap.parse_args()
    work, out = a.work.resolve(), a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU and the checkpoint's fp32, as --model hf below
    server = Process([sys.executable, "-m", "star_elastic.cli", "serve", str(work / "proxy-full"), "--arch-file",
                      str(work / "archs.json"), "--name", "tiny", "--port", str(port)], port, out / "serve.log", env)
    try:
        server.wait_ready(300)
        served = lm_eval("local-completions", f"model=tiny@half,base_url={server.url}/v1/completions,"
                         f"tokenizer={work / 'proxy-half'},tokenizer_backend=huggingface,tokenized_requests=False,"
                         "max_retries=1", 8, out / "served")
    finally:
        server.stop()
    local = lm_eval("hf", f"pretrained={work / 'proxy-half'},dtype=float32", 8, out / "local")
    s, loc = read_samples(served), read_samples(local)
    r = compare(s, loc, a.atol)
    ok = r["past_atol"] == 0 and not r["picks_differ"]
    print(f"lm-eval {TASK}, {r['items']} items / {r['choices']} choices, served (tiny@half) vs --model hf on the "
          f"slice: log-likelihood max |diff| {r['max_abs_diff']:.2e}, mean {r['mean_abs_diff']:.2e} nats "
          f"({r['past_atol']} past {a.atol:g}); picks differ on {len(r['picks_differ'])}; accuracy "
          f"{accuracy(s)} / {accuracy(loc)}")
    print(f"lm-eval parity: {'PASS' if ok else 'FAIL'} (outputs in {out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
