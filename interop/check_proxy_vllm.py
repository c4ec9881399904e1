"""`make interop`, part 2: the budget-control proxy over two real vLLM servers. Not part of `make test`.

    python interop/check_proxy_vllm.py --vllm-python .venv-vllm/bin/python [--work DIR]

A small random model (head_dim 32, vocabulary = the demo tokenizer's, so every id decodes to text
and back) is saved with its tokenizer; its nested half (interop/check_vllm.py's slice) and itself
are served by two `vllm.entrypoints.openai.api_server` processes on 127.0.0.1 (fp32, our relu² CPU
MoE plugin). `star-elastic serve CKPT --think-backend vLLM-half --answer-backend vLLM-full` then
answers chat requests (greedy, `skip_special_tokens: false` so `</think>` and eos text survive), and
each answer must equal, field by field (reasoning and answer text, token counts, forced end of the
trace), the one our own server gives for the same request with the same split in-process
(`make_local_app` over the checkpoint: think on the variant "half", answer on "full").
Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch

from star_elastic import HybridLM, ModelConfig
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.elastic.arch import slice_model
from star_elastic.hf import save_model
from star_elastic.infer.budget import ElasticServer
from star_elastic.serve.app import BackgroundServer, ServeConfig, make_local_app

from check_vllm import CONFIG, nested_slice, vllm_env  # this folder: the same small model and slice as part 1

MESSAGES = ["2+7-5-1=", "a=6 b=a+2 c=b+3 d=c*3 d?", "reverse abcdef", "12*3+4=", "x=3 y=x*x y?", "9-4+8=",
            "what is 7-5?", "sort 3 1 2"]


def model_with_tokenizer(seed: int = 0) -> HybridLM:
    """check_vllm's parent, with the demo tokenizer's vocabulary (weights well away from zero: no greedy ties).

    The </think> logit is scaled up 3x so that about half the traces close by themselves and the
    rest hit the cap (both ways of ending phase 1 are compared)."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = HybridLM(ModelConfig(**(CONFIG | {"vocab_size": len(tok)}))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
        model.lm_head.weight[tok.convert_tokens_to_ids("</think>")] *= 3
    model.tokenizer = tok
    return model


class Process:
    """A server child process on 127.0.0.1 (its log in a file), ready once GET /health answers 200."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.url} exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"{self.url} not ready after {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_server(python: str, model: Path, name: str, work: Path) -> Process:
    port = free_port()
    env = vllm_env(OMP_NUM_THREADS="1")
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
           "--max-num-seqs", "8", "--enforce-eager", "--seed", "0"]
    return Process(cmd, port, work / f"vllm_{name}.log", env)


def answer(url: str, model: str, msg: str, cap: int, n: int, budgets: dict) -> tuple:
    """(reasoning text, answer text, reasoning tokens, completion tokens, forced </think>) of one greedy chat."""
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": msg}], temperature=0, max_tokens=n,
                                  extra_body={"max_think_tokens": cap, "skip_special_tokens": False} | budgets)
    choice = r.choices[0]
    return (choice.message.reasoning_content, choice.message.content, r.usage.completion_tokens_details.reasoning_tokens,
            r.usage.completion_tokens, choice.forced_end_of_think)


def compare(proxy_url: str, local_url: str, cap: int, n: int) -> int:
    same = forced = 0
    for msg in MESSAGES:
        got = answer(proxy_url, "proxy", msg, cap, n, {})
        want = answer(local_url, "local", msg, cap, n, {"think_budget": "half", "answer_budget": "full"})
        same += got == want
        forced += want[-1]
        print(f"{'ok ' if got == want else 'BAD'} {msg!r}: proxy over vLLM {got[:4]} in-process {want[:4]}")
    print(f"{len(MESSAGES) - forced} of {len(MESSAGES)} traces closed themselves, the others hit the cap (</think> forced)")
    print(f"proxy over vLLM (think: half slice, answer: full model) == in-process budget control on {same} of "
          f"{len(MESSAGES)} chat requests (think cap {cap}, answer cap {n}, greedy, token counts included)")
    return len(MESSAGES) - same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", required=True, help="python of the vLLM venv")
    ap.add_argument("--work", type=Path, default=None, help="folder for checkpoints and logs (default: a temp folder)")
    ap.add_argument("--think-cap", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=12)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="star-proxy-"))
    work.mkdir(parents=True, exist_ok=True)
    model = model_with_tokenizer()
    arch = nested_slice(model.config)
    save_model(model, work / "proxy-full")
    half = slice_model(model, arch)
    half.tokenizer = model.tokenizer
    save_model(half, work / "proxy-half")
    (work / "archs.json").write_text(json.dumps({"half": arch.to_dict()}))  # `serve proxy-full --arch-file` (lm-eval recipe)
    local = make_local_app(ElasticServer.from_checkpoint(work / "proxy-full", {"half": arch}), ServeConfig(name="local"))

    backends = [vllm_server(a.vllm_python, work / "proxy-half", "half", work),
                vllm_server(a.vllm_python, work / "proxy-full", "full", work)]
    proxy = None
    try:
        for b in backends:
            b.wait_ready(900)
        port = free_port()
        proxy = Process([sys.executable, "-m", "star_elastic.cli", "serve", str(work / "proxy-full"), "--port", str(port),
                         "--name", "proxy", "--think-backend", f"{backends[0].url}#half",
                         "--answer-backend", f"{backends[1].url}/v1#full"], port, work / "proxy.log")
        proxy.wait_ready(120)
        with BackgroundServer(local) as bg:
            bad = compare(proxy.url, bg.url, a.think_cap, a.max_tokens)
    finally:
        for p in [proxy, *backends]:
            if p is not None:
                p.stop()
    print(f"proxy interop: {'PASS' if bad == 0 else f'FAIL ({bad})'} (checkpoints and logs in {work})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
