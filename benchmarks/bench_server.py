"""`star-elastic serve` measured side by side: each server is its own `star-elastic serve` process
on 127.0.0.1 (clients stay in this process, so they do not share the server's interpreter).

    python benchmarks/bench_server.py [RUN] [--width-scale 1.0] [--requests 64] [--rounds 3]
                                      [--only memory] [--threads 1]

1. Throughput (completion tokens/s) with 1, 8 and 32 concurrent clients, mixed budgets and one
   budget, two-phase chat requests (greedy, think cap 16, answer cap 16); goal: 32 clients >= 8x
   one client. Passes over the client counts are interleaved, medians compared; tokens per server
   CPU second are printed too.
2. Memory of the server (proportional set size summed over its HTTP and engine processes: the
   weights they share count once) after requests on every budget ÷ after requests on the parent
   alone (goal <= 1.1), plus the weight bytes the budget views own (counted in-process).
3. Proxy overhead: the same sequential requests in-process (think 0.5 → answer 1.0) and through the
   proxy over two servers, interleaved passes, medians; and the answer phase's re-prefill of prompt
   + trace, timed on its own.
Without RUN a random model of the demo parent's shape is saved to a temporary run folder
(weights do not change the cost).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

import openai
import torch

from star_elastic.config import ElasticConfig
from star_elastic.data.tokenizer import build_tokenizer, format_prompt
from star_elastic.elastic.router import fit_router_to_cost
from star_elastic.elastic.run import build_elastic, load_elastic, save_run
from star_elastic.infer.budget import ElasticServer
from star_elastic.infer.generate import prefill
from star_elastic.model.hybrid import HybridLM
from star_elastic.runtime import tune_cpu_allocator
from star_elastic.train.parent import ParentConfig, model_config

SERVE_FLAGS: list[str] = []  # flags every server gets (--threads N)
PROMPTS = ["2+7-5-1=", "a=6 b=a+2 c=b+3 d=c*3 d?", "reverse abcdef", "12*3+4=", "x=3 y=x*x y?", "9-4+8="]


def random_elastic(width_scale: float):
    tok = build_tokenizer()
    model = HybridLM(model_config(ParentConfig(width_scale=width_scale), tok)).init_weights(seed=0).eval()
    model.tokenizer = tok
    elastic = build_elastic(model, ElasticConfig(), None, None)
    fit_router_to_cost(elastic.router, elastic.cost, elastic.ecfg.budgets, steps=60)
    return elastic.eval()


def chat(i: int, budgets: list[float], cap: int = 16) -> dict:
    return dict(model="bench", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], temperature=0,
                max_tokens=16, extra_body={"think_budget": budgets[i % len(budgets)],
                                           "answer_budget": budgets[(i + 1) % len(budgets)], "max_think_tokens": cap})


async def clients(url: str, n_clients: int, n_requests: int, budgets: list[float]) -> tuple[int, float]:
    """n_clients loops sharing n_requests; returns (completion tokens, seconds)."""
    queue = list(range(n_requests))
    tokens = 0

    async def worker(c: openai.AsyncOpenAI):
        nonlocal tokens
        while queue:
            r = await c.chat.completions.create(**chat(queue.pop(), budgets))
            tokens += r.usage.completion_tokens

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(n_clients)))
        return tokens, time.perf_counter() - t0


class Served:
    """`star-elastic serve ARGS` on a free 127.0.0.1 port, as a child process; a context manager."""

    def __init__(self, *args: str):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "star_elastic.cli", "serve", *args, *SERVE_FLAGS,
                                      "--port", str(self.port), "--name", "bench"])

    def __enter__(self) -> Served:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"server on port {self.port} did not start")

    def pids(self) -> list[int]:
        """The server process and its descendants (the engine process): the server is all of them."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        return out

    def pss_bytes(self) -> int:
        """Proportional set size over the process tree: pages shared by both processes (the weights,
        in shared memory) count once in the sum."""
        total = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server's processes so far (all their threads)."""
        total = 0.0
        for pid in self.pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def throughput(run: str, budgets: list[float], n_requests: int, rounds: int) -> None:
    """Rates at 1, 8, 32 clients, measured in `rounds` interleaved passes (1, 8, 32, 1, 8, 32, ...); each
    count's rate is the median of its passes, so drift in the machine's speed over the run (other jobs on a
    shared CPU) lands on every count alike. Server CPU seconds (its HTTP and engine processes, from /proc)
    give tokens per server CPU second too, which hold when other jobs share the cores."""
    with Served(run, "--max-batch", "32") as srv:
        asyncio.run(clients(srv.url, 4, 8, budgets))  # warm-up: allocator primed
        for label, bs in (("mixed budgets", budgets), ("one budget (1.0)", [max(budgets)])):
            rates: dict[int, list[tuple[float, float]]] = {1: [], 8: [], 32: []}
            for _ in range(rounds):
                for n in rates:
                    cpu0 = srv.cpu_seconds()
                    tokens, secs = asyncio.run(clients(srv.url, n, n_requests if n > 1 else n_requests // 4, bs))
                    rates[n].append((tokens / secs, tokens / (srv.cpu_seconds() - cpu0)))
            one, one_cpu = (statistics.median(r[i] for r in rates[1]) for i in (0, 1))
            for n, runs in rates.items():
                wall, cpu = (statistics.median(r[i] for r in runs) for i in (0, 1))
                passes = " / ".join(f"{r[0]:.0f}" for r in runs)
                print(f"  {label:16s} {n:2d} clients: {wall:7.1f} tokens/s ({wall / one:.2f}x one client; passes "
                      f"{passes}); {cpu:7.1f} tokens per server CPU-s ({cpu / one_cpu:.2f}x)")


def memory(run: str, server, budgets: list[float]) -> None:
    top = max(budgets)
    with Served(run) as srv:
        asyncio.run(clients(srv.url, 4, 8, [top]))
        alone = srv.pss_bytes()
        asyncio.run(clients(srv.url, 4, 8 * len(budgets), budgets))
        every = srv.pss_bytes()
    parent = server.model(top)
    storages = {p.untyped_storage().data_ptr() for p in parent.parameters()}
    weights = sum(p.numel() * p.element_size() for p in parent.parameters())
    owned = sum(p.numel() * p.element_size() for b in budgets for p in server.model(b).parameters()
                if p.untyped_storage().data_ptr() not in storages)
    print(f"  server memory (PSS of its processes) after parent-only requests {alone / 2**20:.0f} MiB, "
          f"after every budget {every / 2**20:.0f} MiB: ratio {every / alone:.3f}")
    print(f"  weights {weights / 2**20:.1f} MiB; the budget views own {owned / 2**20:.2f} MiB ({owned / weights:.2%})")


def proxy_body(i: int, proxied: bool) -> dict:
    """Think on 0.5, answer on 1.0: chosen per request in-process, by the backends behind the proxy."""
    body = chat(i, [0.5], cap=32)
    body["extra_body"] = {"max_think_tokens": 32} | ({} if proxied else {"think_budget": 0.5, "answer_budget": 1.0})
    return body


def sequential(url: str, n: int, proxied: bool) -> float:
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    for i in range(n):
        c.chat.completions.create(**proxy_body(i, proxied))
    return (time.perf_counter() - t0) / n


def proxy_overhead(run: str, server, n: int, rounds: int) -> None:
    """Per-request time in-process and through the proxy, `rounds` interleaved passes of n requests each
    (medians compared, as for throughput)."""
    with Served(run) as local, Served(run) as answerer:
        with Served(run, "--think-backend", f"{local.url}#bench@0.5", "--answer-backend",
                    f"{answerer.url}#bench@1") as proxy:
            sequential(local.url, 2, False), sequential(proxy.url, 2, True)  # warm-up
            passes = [(sequential(local.url, n, False), sequential(proxy.url, n, True)) for _ in range(rounds)]
    local_s, proxy_s = (statistics.median(p[i] for p in passes) for i in (0, 1))
    shown = " / ".join(f"{a * 1e3:.0f}:{b * 1e3:.0f}" for a, b in passes)
    print(f"  per request: in-process {local_s * 1e3:.1f} ms, proxy {proxy_s * 1e3:.1f} ms ({proxy_s / local_s:.2f}x; "
          f"passes in-process:proxy ms {shown})")
    tok = server.model(1.0).tokenizer
    prompt = tok.encode(format_prompt(tok, PROMPTS[1]), add_special_tokens=False)
    trace = server.generate([prompt], 0.5, 1.0, 32, 16).results[0].think_tokens
    answer_model = server.model(1.0)
    prefill(answer_model, [prompt + trace])
    t0 = time.perf_counter()
    for _ in range(10):
        prefill(answer_model, [prompt + trace])
    pre = (time.perf_counter() - t0) / 10
    print(f"  re-prefill of prompt+trace ({len(prompt) + len(trace)} tokens) on the answer model, in this process: "
          f"{pre * 1e3:.1f} ms = {pre / local_s:.1%} of an in-process request. In-process budget control pays it "
          "too when the budgets differ (as here): the answer budget's submodel cannot reuse the think submodel's "
          "state; with equal budgets the answer continues the trace's cache in place.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?")
    ap.add_argument("--width-scale", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=64,
                    help="requests per 8- or 32-client pass (a quarter for one client)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved passes over 1, 8, 32 clients (median of each)")
    ap.add_argument("--only", choices=("throughput", "memory", "proxy"), help="run one of the three parts")
    ap.add_argument("--threads", type=int, help="serve --threads N for every server (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        SERVE_FLAGS.extend(["--threads", str(args.threads)])
        torch.set_num_threads(args.threads)  # this process times the re-prefill
    tune_cpu_allocator()
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    run = args.run
    if run is None:
        run = tmp.name + "/run"
        save_run(random_elastic(args.width_scale), run)
    elastic = load_elastic(run)
    server = ElasticServer.from_elastic(elastic)
    budgets = list(elastic.ecfg.budgets)
    print(f"model: {elastic.model.num_parameters() / 1e6:.2f}M parameters, budgets {budgets}, "
          f"{torch.get_num_threads()} threads")
    if args.only in (None, "throughput"):
        print("throughput (two-phase chat):")
        throughput(run, budgets, args.requests, args.rounds)
    if args.only in (None, "memory"):
        print("memory:")
        memory(run, server, budgets)
    if args.only in (None, "proxy"):
        print("proxy overhead (sequential, one client):")
        proxy_overhead(run, server, 8, args.rounds)
    tmp.cleanup()


if __name__ == "__main__":
    main()
