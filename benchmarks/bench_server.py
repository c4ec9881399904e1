"""`star-elastic serve` measured side by side, in one process (servers on 127.0.0.1 threads).

    python benchmarks/bench_server.py [RUN] [--width-scale 1.0] [--requests 64]

1. Throughput (completion tokens/s) with 1, 8 and 32 concurrent clients, mixed budgets, two-phase
   chat requests (greedy, think cap 16, answer cap 16); goal: 32 clients >= 8x one client.
2. Resident memory: the serving process after requests on every budget ÷ after serving the parent
   alone (goal <= 1.1), plus the weight bytes the budget views own.
3. Proxy overhead: the same sequential requests in-process (think 0.5 → answer 1.0) and through the
   proxy over two servers; and the answer phase's re-prefill of prompt + trace, timed on its own.
Without RUN a random model of the demo parent's shape is used (weights do not change the cost).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import openai
import torch

from star_elastic.config import ElasticConfig
from star_elastic.data.tokenizer import build_tokenizer, format_prompt
from star_elastic.elastic.router import fit_router_to_cost
from star_elastic.elastic.run import build_elastic, load_elastic
from star_elastic.infer.budget import ElasticServer
from star_elastic.infer.generate import prefill
from star_elastic.model.hybrid import HybridLM
from star_elastic.runtime import tune_cpu_allocator
from star_elastic.serve.app import BackgroundServer, ServeConfig, make_local_app, make_proxy_app
from star_elastic.train.parent import ParentConfig, model_config

PROMPTS = ["2+7-5-1=", "a=6 b=a+2 c=b+3 d=c*3 d?", "reverse abcdef", "12*3+4=", "x=3 y=x*x y?", "9-4+8="]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


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
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    queue = list(range(n_requests))
    tokens = 0

    async def worker():
        nonlocal tokens
        while queue:
            r = await c.chat.completions.create(**chat(queue.pop(), budgets))
            tokens += r.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_clients)))
    return tokens, time.perf_counter() - t0


def throughput(server, budgets, n_requests: int) -> None:
    with BackgroundServer(make_local_app(server, ServeConfig(name="bench", max_batch=32))) as bg:
        asyncio.run(clients(bg.url, 4, 8, budgets))  # warm-up: views built, allocator primed
        rates = {}
        for n in (1, 8, 32):
            tokens, secs = asyncio.run(clients(bg.url, n, max(n_requests, n) if n > 1 else n_requests // 4, budgets))
            rates[n] = tokens / secs
            print(f"  {n:2d} clients: {tokens:5d} tokens in {secs:6.2f} s = {rates[n]:7.1f} tokens/s "
                  f"({rates[n] / rates[1]:.2f}x one client)")
        print(f"  peak rows decoding at once: {bg.app.state.engine.scheduler.peak_rows}")


def memory(server, budgets) -> None:
    top = max(budgets)
    with BackgroundServer(make_local_app(server, ServeConfig(name="bench", max_batch=32))) as bg:
        asyncio.run(clients(bg.url, 4, 8, [top]))
        gc.collect()
        alone = rss_bytes()
        asyncio.run(clients(bg.url, 4, 8 * len(budgets), budgets))
        gc.collect()
        every = rss_bytes()
    parent = server.model(top)
    storages = {p.untyped_storage().data_ptr() for p in parent.parameters()}
    weights = sum(p.numel() * p.element_size() for p in parent.parameters())
    owned = sum(p.numel() * p.element_size() for b in budgets for p in server.model(b).parameters()
                if p.untyped_storage().data_ptr() not in storages)
    print(f"  RSS serving the parent alone {alone / 2**20:.0f} MiB, every budget {every / 2**20:.0f} MiB: "
          f"ratio {every / alone:.3f}")
    print(f"  weights {weights / 2**20:.1f} MiB; views own {owned / 2**20:.2f} MiB ({owned / weights:.2%})")


def proxy_body(i: int, proxied: bool) -> dict:
    """Think on 0.5, answer on 1.0: chosen per request in-process, by the backends behind the proxy."""
    body = chat(i, [0.5], cap=32)
    body["extra_body"] = {"max_think_tokens": 32} | ({} if proxied else {"think_budget": 0.5, "answer_budget": 1.0})
    return body


def proxy_overhead(server, n: int) -> None:
    tok = server.model(1.0).tokenizer
    with BackgroundServer(make_local_app(server, ServeConfig(name="bench"))) as local, \
            BackgroundServer(make_local_app(server, ServeConfig(name="bench"))) as answerer:
        proxy_app = make_proxy_app(f"{local.url}#bench@0.5", f"{answerer.url}#bench@1", tok, ServeConfig(name="bench"))
        with BackgroundServer(proxy_app) as proxy:
            times = {}
            for label, url in (("in-process", local.url), ("proxy", proxy.url), ("in-process", local.url)):
                c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
                t0 = time.perf_counter()
                for i in range(n):
                    c.chat.completions.create(**proxy_body(i, label == "proxy"))
                times[label] = (time.perf_counter() - t0) / n  # the second in-process pass is the one kept
    print(f"  per request: in-process {times['in-process'] * 1e3:.1f} ms, proxy {times['proxy'] * 1e3:.1f} ms "
          f"({times['proxy'] / times['in-process']:.2f}x)")
    prompt = tok.encode(format_prompt(tok, PROMPTS[1]), add_special_tokens=False)
    trace = server.generate([prompt], 0.5, 1.0, 32, 16).results[0].think_tokens
    answer_model = server.model(1.0)
    t0 = time.perf_counter()
    for _ in range(10):
        prefill(answer_model, [prompt + trace])
    pre = (time.perf_counter() - t0) / 10
    print(f"  re-prefill of prompt+trace ({len(prompt) + len(trace)} tokens) on the answer model: {pre * 1e3:.1f} ms "
          f"({pre / times['in-process']:.1%} of an in-process request; paid in-process too: the answer budget's "
          "model has its own state)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?")
    ap.add_argument("--width-scale", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=64)
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.manual_seed(0)
    elastic = load_elastic(args.run) if args.run else random_elastic(args.width_scale)
    server = ElasticServer.from_elastic(elastic)
    budgets = list(elastic.ecfg.budgets)
    print(f"model: {elastic.model.num_parameters() / 1e6:.2f}M parameters, budgets {budgets}, "
          f"{torch.get_num_threads()} threads")
    print("throughput (two-phase chat, mixed budgets):")
    throughput(server, budgets, args.requests)
    print("memory:")
    memory(server, budgets)
    print("proxy overhead (sequential):")
    proxy_overhead(server, 8)


if __name__ == "__main__":
    main()
