"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (`make fuzz`; needs the `fuzz` extra).

    python scripts/fuzz_server.py [--max-examples 1000] [--max-time 600] [--workers 2] [--seed 0]

Serves a tiny random elastic model (the demo tokenizer, the router fitted to the cost) on 127.0.0.1
as `star-elastic serve` does (its engine in its own process), and runs schemathesis against
/openapi.json: schema-valid requests (the served model ids and budgets are enums of the schema, so
they reach generation: sampling, seeds, n, stop strings, logprobs, echo, budgets, caps, streaming)
and schema-violating ones, on every operation, at most --max-examples cases per operation and phase
within --max-time seconds. Checks: no 5xx (500 and 503 are declared, but each is a failure here);
every response's status code, content type and body (each streamed event too) conform to the
schema; schema-violating input is refused with a 4xx. Afterwards /health must answer 200 and a
greedy chat request the same answer as before the fuzzing. Prints "N requests, M failures" (N
counted by the server, M test cases with a failed check) and the responses by status and error
code; exits 1 on any failure or error.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection")
CANARY = {"model": "fuzz", "messages": [{"role": "user", "content": "1+2=?"}], "temperature": 0, "max_tokens": 6,
          "max_think_tokens": 6, "think_budget": 0.5, "answer_budget": 1.0}


def tiny_server():
    """An ElasticServer over a random tiny Nemotron-H (every block type) with the demo tokenizer."""
    from star_elastic.config import ElasticConfig, ModelConfig
    from star_elastic.data.tokenizer import build_tokenizer
    from star_elastic.elastic.router import fit_router_to_cost
    from star_elastic.elastic.run import build_elastic
    from star_elastic.infer.budget import ElasticServer
    from star_elastic.model.hybrid import HybridLM

    tok = build_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=64, pattern="M*EM-E", num_attention_heads=8,
                      num_key_value_heads=2, head_dim=16, intermediate_size=64, mamba_num_heads=8, mamba_head_dim=16,
                      ssm_state_size=8, n_groups=2, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = HybridLM(cfg).init_weights(seed=0).eval()
    model.tokenizer = tok
    elastic = build_elastic(model, ElasticConfig(), None, None)
    fit_router_to_cost(elastic.router, elastic.cost, elastic.ecfg.budgets, steps=60)
    return ElasticServer.from_elastic(elastic.eval())


class Tally:
    """ASGI wrapper counting the requests the server answers, by status and error code."""

    def __init__(self, app):
        self.app, self.by_status = app, collections.Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {}

        async def tap(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body" and seen.get("status", 200) >= 400 and "code" not in seen:
                try:
                    seen["code"] = json.loads(message.get("body", b""))["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    seen["code"] = None
            await send(message)

        try:
            await self.app(scope, receive, tap)
        finally:
            self.by_status[(seen.get("status"), seen.get("code"))] += 1


def schemathesis(url: str, args: argparse.Namespace, report: Path) -> int:
    """Run the schemathesis CLI; its JSON run report goes to `report`. Returns its exit code."""
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe), "run", f"{url}/openapi.json", "--checks", CHECKS, "--max-examples", str(args.max_examples),
           "--max-time", str(args.max_time), "--workers", str(args.workers), "--seed", str(args.seed),
           "--request-timeout", "120", "--suppress-health-check", "all", "--continue-on-failure",
           "--report", "json", "--report-json-path", str(report)]
    print(" ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, timeout=args.max_time + 600).returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-examples", type=int, default=1000, help="cases per operation and phase")
    p.add_argument("--max-time", type=int, default=600, help="seconds for schemathesis' whole run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, help="keep schemathesis' JSON run report here")
    args = p.parse_args()

    from star_elastic.serve.app import BackgroundServer, ServeConfig, make_local_app

    cfg = ServeConfig(name="fuzz", phases={"max_think_tokens": 8, "max_answer_tokens": 8}, threads=1)
    app = make_local_app(tiny_server(), cfg, max_context=256)
    tally = Tally(app)
    with BackgroundServer(tally) as bg, tempfile.TemporaryDirectory() as tmp:
        report = args.report or Path(tmp) / "report.json"
        before = httpx.post(bg.url + "/v1/chat/completions", json=CANARY, timeout=60).json()["choices"]
        code = schemathesis(bg.url, args, report)
        run = json.loads(report.read_text())
        health = httpx.get(bg.url + "/health", timeout=60)
        after = httpx.post(bg.url + "/v1/chat/completions", json=CANARY, timeout=60).json().get("choices")
    requests = sum(tally.by_status.values()) - 2  # less the canary's first request and /health
    failures, errors = run["test_cases"]["with_failures"], sum(e["count"] for e in run["errors"])
    for (status, error_code), n in sorted(tally.by_status.items(), key=lambda kv: (kv[0][0] or 0, str(kv[0][1]))):
        print(f"  {status} {error_code or ''}: {n}")
    for failure in run["failures"]:
        print(f"  failure: {failure['title']} ({failure['count']}) in {', '.join(failure['operations'])}")
    healthy = health.status_code == 200 and after == before
    print(f"{requests} requests, {failures} failures ({run['test_cases']['generated']} test cases, {errors} errors, "
          f"{run['running_time']:.0f} s); afterwards /health {health.status_code}, the canary's answer "
          f"{'unchanged' if after == before else 'CHANGED'}")
    return 0 if code == 0 and failures == 0 and errors == 0 and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
