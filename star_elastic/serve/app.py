"""The FastAPI app: OpenAI routes → request schema → `Spec`s (one per prompt and choice) → engine →
JSON or SSE response. The OpenAPI schema is served at /openapi.json.

Model ids: NAME (elastic: the server's default budgets, `--think` / `--answer`) and NAME@B for every
trained budget B (think and answer on B; a plain completion on B for /v1/completions). Per-request
fields override: `think_budget`, `answer_budget` (resolved as the CLI's `--think` / `--answer` are:
`star_elastic.infer.budget.resolve`), `max_think_tokens` / `thinking_token_budget`, `max_tokens`.

Log-probabilities (completions `logprobs: K`, chat `logprobs` + `top_logprobs: K`) are those of the
raw model distribution (log_softmax of the logits, before temperature and top_p), each token's under
the budget that produced it: the think budget's for the trace and its closing token, the answer
budget's for the answer and for an echoed prompt; each choice's `logprob_budgets` lists the ranges.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from star_elastic.config import ConfigError, typed_blocks
from star_elastic.infer.budget import PhaseConfig, open_server, resolve, variant_label
from star_elastic.infer.generate import GenerationConfig, Logprob
from star_elastic.runtime import check_device
from star_elastic.serve import errors, schemas
from star_elastic.serve.engine import Progress, Spec
from star_elastic.serve.errors import RequestError
from star_elastic.serve.schemas import BaseRequest, ChatRequest, CompletionRequest

MAX_BODY_BYTES = 1 << 22
LOGPROB_FLOOR = -9999.0  # a log-probability of -inf is reported as this (JSON has no infinity), as vLLM
log = logging.getLogger("star_elastic.serve")


@dataclasses.dataclass
class ServeConfig:
    """How `star-elastic serve` answers; budgets default to the largest trained one (the parent)."""

    run: str | None = None
    """An elastic run folder, or a sorted checkpoint with --arch-file (with the backend flags: only its
    tokenizer is read)."""
    arch_file: str | None = None
    """Serve a sorted checkpoint (no router) with named architectures: JSON {"12b": {"hidden": 1536, ...}, ...}
    as for slice; "full" is always there."""
    device: str = "auto"
    """auto (CUDA where present), cpu, cuda or cuda:N."""
    think_backend: str | None = None
    """Proxy: run the think phase on this OpenAI-compatible server, URL[#model]."""
    answer_backend: str | None = None
    """Proxy: run the answer phase on this OpenAI-compatible server, URL[#model]."""
    backend_api_key: str | None = None
    """Bearer key sent to the backends."""
    name: str | None = None
    """Model id of the elastic model (default: the run folder's name); budget entries are NAME@B."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """When set, every /v1 request needs `Authorization: Bearer KEY`."""
    phases: PhaseConfig = dataclasses.field(default_factory=PhaseConfig)
    """The defaults of a request that names none: think and answer submodels (`think_budget`,
    `answer_budget` of a request), trace cap (`max_think_tokens`) and answer cap (`max_tokens`)."""
    max_batch: int = 32
    """Jobs decoding at once, over every budget; more wait in a queue."""
    threads: int | None = None
    """torch intra-op threads of the worker; None keeps torch's default. On a small shared CPU, 1
    is faster for small models: two threads wait on each other in every op whenever another
    process holds a core."""

    def __post_init__(self) -> None:
        typed_blocks(self)
        check_device(self.device)
        self.name = self.name or (Path(self.run).resolve().name if self.run else "star-elastic")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"serve: --threads must be >= 1, got {self.threads}")
        if self.max_batch < 1:
            raise ConfigError(f"serve: need max_batch >= 1, got {self.max_batch}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"serve: --port {self.port} is not a TCP port")
        if self.api_key == "":
            raise ConfigError("serve: --api-key is empty")


def budget_id(name: str, budget: float | str) -> str:
    return f"{name}@{variant_label(budget)}"


class Router:
    """Request schema → Spec, with every budget / model check in one place.

    Budgets are the server's variant keys: trained budget fractions (floats, listed largest first),
    or names of explicit architectures (strings, kept in their order)."""

    def __init__(self, cfg: ServeConfig, budgets: list[float | str]):
        """An empty `budgets` means a proxy: its backends fix the budgets, requests may not choose.
        Defaults the budgets do not hold are a ConfigError (`resolve`'s, as `generate` gives it)."""
        numeric = all(isinstance(b, float) for b in budgets)
        self.cfg, self.budgets = cfg, sorted(budgets, reverse=True) if numeric else list(budgets)
        if not self.budgets:
            if cfg.phases.think is not None or cfg.phases.answer is not None:
                raise ConfigError("serve: a proxy's budgets are fixed by --think-backend/--answer-backend; "
                                  "drop --think/--answer")
            self.default_think = self.default_answer = 1.0  # placeholders: the backends decide
            return
        self.default_think, self.default_answer = cfg.phases.submodels(self.budgets)

    def _budget(self, value: float | str, param: str) -> float | str:
        """A request's budget field, by the CLI's resolver: its ConfigError becomes this 400, word for word."""
        if not self.budgets:
            raise RequestError(f"{param}: this proxy's budgets are fixed by --think-backend/--answer-backend; "
                               "drop the field", param=param, code="budget_out_of_range")
        try:
            return resolve(value, self.budgets, param)
        except ConfigError as err:
            raise RequestError(str(err), param=param, code="budget_out_of_range") from None

    def model_budget(self, model: str) -> float | str | None:
        """None for the elastic id, the budget for NAME@B; 404 for anything else."""
        if model == self.cfg.name:
            return None
        for b in self.budgets:
            if model == budget_id(self.cfg.name, b):
                return b
        raise RequestError(f"model {model!r} does not exist; GET /v1/models lists "
                           f"{self.cfg.name!r} and its budgets", param="model", code="model_not_found", status=404)

    def spec(self, req: BaseRequest, prompt, chat: bool, choice: int = 0, request_id: str = "") -> Spec:
        """The Spec of one prompt's choice `choice` (its seed: the request's + choice, mod 2**63)."""
        pinned = self.model_budget(req.model)
        default_think = self.default_think if pinned is None else pinned
        default_answer = self.default_answer if pinned is None else pinned
        answer = default_answer if req.answer_budget is None else self._budget(req.answer_budget, "answer_budget")
        two_phase = chat or pinned is None or req.think_budget is not None or req.think_cap() is not None
        think = None
        if two_phase:
            think = default_think if req.think_budget is None else self._budget(req.think_budget, "think_budget")
        cap = req.think_cap()
        answer_cap = req.answer_cap() if isinstance(req, ChatRequest) else req.max_tokens
        greedy = req.temperature < schemas.GREEDY_BELOW
        seed = None if req.seed is None else (req.seed + choice) % (schemas.MAX_SEED + 1)
        sampling = GenerationConfig(temperature=0.0 if greedy else float(req.temperature), top_p=float(req.top_p),
                                    seed=seed, stop_strings=req.stops(), logprobs=req.top_logprobs_k())
        phases = self.cfg.phases
        return Spec(prompt, answer, think, phases.max_think_tokens if cap is None else cap,
                    phases.max_answer_tokens if answer_cap is None else answer_cap, sampling, req.skip_special_tokens,
                    echo=bool(getattr(req, "echo", False)), request_id=request_id)

    def specs(self, req: BaseRequest, prompts: list, chat: bool, request_id: str) -> list[Spec]:
        """Choice i*n + j: prompt i, choice j (OpenAI's order)."""
        return [self.spec(req, p, chat, j, request_id) for p in prompts for j in range(req.n)]


# --- responses -------------------------------------------------------------------------------
def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Text up to the earliest stop string (excluded), and that stop string."""
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    at, stop = min(hits)
    return text[:at], stop


def visible(prog: Progress, spec: Spec) -> tuple[str, str]:
    """(reasoning, content) safe to send now: content cut at a stop string, and while decoding the
    tail that could still grow into one is held back (so streamed text == non-streamed text)."""
    content, stop = cut_at_stop(prog.content, spec.sampling.stop_strings)
    if prog.finish is None and stop is None and spec.sampling.stop_strings:
        hold = max(len(s) for s in spec.sampling.stop_strings) - 1
        content = content[: max(0, len(content) - hold)]
    return prog.reasoning, content


def closing_text(spec: Spec) -> str:
    """What a completion's text shows between trace and answer."""
    return "" if spec.skip_special_tokens else "</think>"


def completion_text(prog: Progress, spec: Spec) -> str:
    reasoning, content = visible(prog, spec)
    if spec.think_budget is None:
        return content
    return reasoning + (closing_text(spec) if prog.finish is not None or content else "") + content


def usage(progs: list[Progress], n: int = 1) -> dict:
    """Token counts of a response; choices come n per prompt, each prompt counted once."""
    prompt = sum(p.prompt_tokens for p in progs[::n])
    reasoning = sum(p.reasoning_tokens for p in progs)
    completion = reasoning + sum(p.content_tokens for p in progs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def finish_fields(prog: Progress, spec: Spec) -> dict:
    _, stop = cut_at_stop(prog.content, spec.sampling.stop_strings)
    return {"finish_reason": prog.finish, "stop_reason": stop,
            "forced_end_of_think": prog.forced_end_of_think if spec.think_budget is not None else None}


# --- log-probabilities -------------------------------------------------------------------------
def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


Scored = tuple[int, Logprob | None, str, float | str, int]  # token, log-probabilities, part, budget, width


def scored(engine, prog: Progress, spec: Spec, echo: bool) -> list[Scored]:
    """(token, log-probabilities, part, budget, width in the text) of each token a completion's `logprobs`
    lists: the echoed prompt's, then every generated token (the trace and its closing token, the answer
    and its eos). Widths follow `completion_text`: the closing token takes the room of the `</think>` it
    writes (none with skip_special_tokens), eos none, special tokens the text skips none."""
    def width(t: int) -> int:
        return len(engine.token_text(t, spec.skip_special_tokens))

    close = len(closing_text(spec))
    out = []
    if echo:
        out += [(t, lp, "prompt", spec.answer_budget, width(t))
                for t, lp in zip(prog.prompt_ids, prog.prompt_logprobs or [])]
    out += [(t, lp, "reasoning", spec.think_budget, width(t) if i < prog.trace_end else close)
            for i, (t, lp) in enumerate(zip(prog.think_ids, prog.think_logprobs))]
    out += [(t, lp, "answer", spec.answer_budget, width(t) if i < prog.body_end else 0)
            for i, (t, lp) in enumerate(zip(prog.answer_ids, prog.answer_logprobs))]
    return out


def budget_ranges(parts: list[tuple[str, float | str]]) -> list[dict]:
    """Consecutive tokens of one part and budget → {"part", "budget", "start", "end"} ranges."""
    ranges: list[dict] = []
    for i, (part, budget) in enumerate(parts):
        if ranges and (ranges[-1]["part"], ranges[-1]["budget"]) == (part, budget):
            ranges[-1]["end"] = i + 1
        else:
            ranges.append({"part": part, "budget": budget, "start": i, "end": i + 1})
    return ranges


def completion_logprobs(engine, prog: Progress, spec: Spec, echo: bool) -> tuple[dict, list[dict]]:
    """OpenAI's legacy `logprobs` object of one choice, and its `logprob_budgets`."""
    entries = scored(engine, prog, spec, echo)
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, lp, _, _, width in entries:
        out["tokens"].append(engine.token_text(token))
        out["text_offset"].append(offset)
        offset += width
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {engine.token_text(token): _finite(lp.logprob)}  # the token's own, then the alternatives
        for alt, value in lp.top:
            top.setdefault(engine.token_text(alt), _finite(value))
        out["token_logprobs"].append(_finite(lp.logprob))
        out["top_logprobs"].append(top)
    return out, budget_ranges([(part, budget) for _, _, part, budget, _ in entries])


def _chat_entry(engine, token: int, lp: Logprob) -> dict:
    def one(t: int, value: float) -> dict:
        text = engine.token_text(t)
        return {"token": text, "logprob": _finite(value), "bytes": list(text.encode())}

    return one(token, lp.logprob) | {"top_logprobs": [one(alt, value) for alt, value in lp.top]}


def chat_logprobs(engine, prog: Progress, spec: Spec) -> tuple[dict, list[dict]]:
    """OpenAI's chat `logprobs` object (plus `reasoning_content`, the trace's) and its `logprob_budgets`."""
    trace = zip(prog.think_ids[: prog.trace_end], prog.think_logprobs)
    body = zip(prog.answer_ids[: prog.body_end], prog.answer_logprobs)
    out = {"content": [_chat_entry(engine, t, lp) for t, lp in body],
           "reasoning_content": [_chat_entry(engine, t, lp) for t, lp in trace], "refusal": None}
    ranges = [{"part": "reasoning", "budget": spec.think_budget, "start": 0, "end": len(out["reasoning_content"])},
              {"part": "answer", "budget": spec.answer_budget, "start": 0, "end": len(out["content"])}]
    return out, [r for r in ranges if r["end"] > 0]


# --- running ---------------------------------------------------------------------------------
async def final(engine, spec: Spec) -> Progress:
    async with contextlib.aclosing(engine.run(spec, partial=False)) as it:
        async for prog in it:
            if prog.finish is not None:
                return prog
    raise RuntimeError("the engine ended without a result")


async def final_unless_gone(request: Request, engine, specs: list[Spec]) -> list[Progress]:
    """Every spec's result. If one fails, or the client disconnects first, the others are cancelled
    (freeing their slots) and the failure (or a 499) is raised."""
    tasks = [asyncio.ensure_future(final(engine, s)) for s in specs]
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=0.25, return_when=asyncio.FIRST_EXCEPTION)
            failures = [t.exception() for t in done if t.exception() is not None]
            if failures:
                raise failures[0]
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                raise RequestError("client disconnected", status=499)
    finally:
        for t in tasks:
            t.cancel()


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def stream_events(engine, spec: Spec, head: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: deltas of reasoning/content (chat) or text (completions), then usage, [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent_r = sent_c = sent_t = ""
    if chat:
        yield sse(head | {"object": kind, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "finish_reason": None}]})
    try:
        async with contextlib.aclosing(engine.run(spec)) as it:
            async for prog in it:
                reasoning, content = visible(prog, spec)
                done = finish_fields(prog, spec) if prog.finish is not None else {"finish_reason": None}
                if chat:
                    delta = {}
                    if len(reasoning) > len(sent_r):
                        delta["reasoning_content"], sent_r = reasoning[len(sent_r):], reasoning
                    if len(content) > len(sent_c):
                        delta["content"], sent_c = content[len(sent_c):], content
                    choice = {"index": 0, "delta": delta} | done
                else:
                    text = completion_text(prog, spec)
                    choice = {"index": 0, "text": text[len(sent_t):]} | done
                    sent_t = text
                if len(choice.get("delta", choice.get("text", ""))) or prog.finish is not None:
                    yield sse(head | {"object": kind, "choices": [choice]})
                if prog.finish is not None and include_usage:
                    yield sse(head | {"object": kind, "choices": [], "usage": usage([prog])})
    except RequestError as err:
        yield sse(errors.error_body(err.message, err.status, err.param, err.code))
    except Exception as err:  # noqa: BLE001 - the stream is open: report in-band, keep serving
        yield sse(errors.error_body(f"generation failed: {err}", 500))
    yield "data: [DONE]\n\n"


# --- the app -----------------------------------------------------------------------------------
class Guard:
    """ASGI middleware on /v1: the Bearer key (constant-time compare) and a body-size limit.

    Plain ASGI, not `@app.middleware("http")`: that wrapper hides the client's disconnect from
    the route, and a disconnect must cancel the request's job."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])  # names are lower-case bytes in ASGI
            refusal = self._refusal(headers)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict[bytes, bytes]):
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return errors.error_response("missing or wrong API key (Authorization: Bearer KEY)", 401,
                                         code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return errors.error_response(f"the body is larger than {MAX_BODY_BYTES} bytes", 413)
        return None


ERRORS = {400: "bad input, naming the field", 401: "missing or wrong API key", 404: "no such model",
          413: "body too large", 500: "generating this request failed (logged with its id)",
          503: "the engine process is gone: restart the server"}


def _documented(*statuses: int, stream: bool = False, ok=None) -> dict:
    """The `responses` of a route for its OpenAPI entry: the 200 model and error bodies."""
    out: dict = {status: {"model": schemas.ErrorResponse, "description": ERRORS[status]} for status in statuses}
    if ok is not None:
        out[200] = {"model": ok, "description": "OK"}
        if stream:  # each event's data: a JSON chunk (or error body), then "[DONE]"
            event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
            out[200]["content"] = {"text/event-stream": {"schema": event}}
    return out


CAPS = ("max_tokens", "max_completion_tokens", "max_think_tokens", "thinking_token_budget")


def openapi_schema(app: FastAPI, served: list[str], budgets: list[float | str], context: int | None,
                   vocab_size: int | None) -> dict:
    """FastAPI's schema, made true to this server: validation errors are 400s (not 422s), `model` /
    `think_budget` / `answer_budget` list the ids and budgets it serves, token caps stop at its context,
    prompt token ids below its vocabulary size."""
    schema = get_openapi(title=app.title, version="1", routes=app.routes)
    for path in schema["paths"].values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for name in ("CompletionRequest", "ChatRequest"):
        props = components[name]["properties"]
        props["model"] = {"type": "string", "enum": served, "title": "Model"}
        if budgets:
            for field in ("think_budget", "answer_budget"):
                props[field] = {"anyOf": [{"enum": budgets}, {"type": "null"}], "title": field}
        for field in CAPS:
            if context is not None and field in props:
                props[field]["anyOf"][0]["maximum"] = context
        if vocab_size is not None and "prompt" in props:
            for token in _integers(props["prompt"]):
                token["maximum"] = vocab_size - 1
    return schema


def _integers(schema):
    """The integer schemas nested in `schema` (a prompt's token ids)."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            yield schema
        for value in schema.values():
            yield from _integers(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _integers(value)


def build_app(engine, router: Router) -> FastAPI:
    """The HTTP API over `engine` (LocalEngine or ProxyEngine); the router's budgets name the model entries."""
    cfg = router.cfg

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.aclose()

    app = FastAPI(title="star-elastic", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_exception_handler(RequestError, errors.on_request_error)
    app.add_exception_handler(RequestValidationError, errors.on_validation_error)
    app.add_exception_handler(HTTPException, errors.on_http_error)
    app.add_exception_handler(Exception, errors.on_any_error)
    app.state.engine, app.state.router = engine, router

    app.add_middleware(Guard, api_key=cfg.api_key)
    facts = getattr(engine, "facts", {})

    @app.get("/v1/models", responses=_documented(401, ok=schemas.ModelList))
    async def models() -> dict:
        now = int(time.time())
        entries = [{"id": cfg.name, "object": "model", "created": now, "owned_by": "star-elastic",
                    "think_budget": router.default_think, "answer_budget": router.default_answer}]
        entries += [{"id": budget_id(cfg.name, b), "object": "model", "created": now, "owned_by": "star-elastic",
                     "parent": cfg.name, "budget": b} | facts.get(b, {}) for b in router.budgets]
        return {"object": "list", "data": entries}

    @app.get("/health", responses=_documented(503, ok=schemas.Health))
    async def health():
        failure = engine.failure()
        if failure is not None:  # orchestrators restart a server whose engine died
            return errors.error_response(failure, 503, code="engine_unavailable")
        return {"status": "ok"}

    @app.post("/v1/completions", responses=_documented(400, 401, 404, 413, 500, 503, stream=True,
                                                       ok=schemas.CompletionResponse))
    async def completions(req: CompletionRequest, request: Request):
        req.check()
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        specs = router.specs(req, req.prompts(), False, head["id"])
        if req.stream:
            if len(specs) > 1:
                raise RequestError("stream one prompt per request", param="prompt")
            engine.check(specs[0])  # a 4xx before the stream opens
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(engine, specs[0], head, False, include),
                                     media_type="text/event-stream")
        progs = await final_unless_gone(request, engine, specs)
        choices = [completion_choice(engine, i, p, s, req.echo) for i, (p, s) in enumerate(zip(progs, specs))]
        return head | {"object": "text_completion", "choices": choices, "usage": usage(progs, req.n)}

    @app.post("/v1/chat/completions", responses=_documented(400, 401, 404, 413, 500, 503, stream=True,
                                                            ok=schemas.ChatResponse))
    async def chat(req: ChatRequest, request: Request):
        req.check()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        specs = router.specs(req, [engine.chat_prompt(messages)], True, head["id"])
        if req.stream:
            engine.check(specs[0])
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(engine, specs[0], head, True, include),
                                     media_type="text/event-stream")
        progs = await final_unless_gone(request, engine, specs)
        choices = [chat_choice(engine, i, p, s) for i, (p, s) in enumerate(zip(progs, specs))]
        return head | {"object": "chat.completion", "usage": usage(progs, req.n), "choices": choices}

    def openapi() -> dict:
        if app.openapi_schema is None:
            served = [cfg.name] + [budget_id(cfg.name, b) for b in router.budgets]
            app.openapi_schema = openapi_schema(app, served, router.budgets, getattr(engine, "max_context", None),
                                                getattr(engine, "vocab_size", None))
        return app.openapi_schema

    app.openapi = openapi
    return app


def completion_choice(engine, index: int, prog: Progress, spec: Spec, echo: bool) -> dict:
    text = completion_text(prog, spec)
    if echo:
        prompt = spec.prompt if isinstance(spec.prompt, str) else \
            engine.tokenizer.decode(prog.prompt_ids, skip_special_tokens=spec.skip_special_tokens)
        text = prompt + text
    choice = {"index": index, "text": text, "logprobs": None} | finish_fields(prog, spec)
    if spec.sampling.logprobs is not None:
        choice["logprobs"], choice["logprob_budgets"] = completion_logprobs(engine, prog, spec, echo)
    return choice


def chat_choice(engine, index: int, prog: Progress, spec: Spec) -> dict:
    reasoning, content = visible(prog, spec)
    choice = {"index": index, "message": {"role": "assistant", "content": content, "reasoning_content": reasoning}}
    choice |= finish_fields(prog, spec)
    if spec.sampling.logprobs is not None:
        choice["logprobs"], choice["logprob_budgets"] = chat_logprobs(engine, prog, spec)
    return choice


def make_local_app(server, cfg: ServeConfig, budgets: list[float | str] | None = None,
                   max_context: int | None = None) -> FastAPI:
    """The app over an ElasticServer-like object: `model(key)` gives a HybridLM (a view) per variant key,
    plus `think_row` / `close_trace` / `answer_row` / `think_end_id` / `eos_id`. Keys default to the
    server's `variants` (named explicit architectures) if it has them, else its trained budgets.
    Starts the engine process (serve/worker.py; picklable server, and a script that calls this needs
    the `if __name__ == "__main__":` guard); the app's shutdown stops it."""
    from star_elastic.serve.engine import LocalEngine

    if budgets is None:
        budgets = list(server.variants) if hasattr(server, "variants") else list(server.elastic.ecfg.budgets)
    router = Router(cfg, budgets)  # a default the budgets do not hold fails here, before the engine starts
    context = max_context or server.model(budgets[0]).config.max_position_embeddings
    return build_app(LocalEngine(server, budgets, cfg.max_batch, context, cfg.threads), router)


class BackgroundServer:
    """uvicorn serving `app` from a thread on 127.0.0.1 (a free port by default); a context manager."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.app, self.url = app, f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def make_proxy_app(think_backend: str, answer_backend: str, tokenizer, cfg: ServeConfig,
                   backend_api_key: str | None = None) -> FastAPI:
    """The same API, budget control run over two OpenAI-compatible backends (see serve/proxy.py)."""
    from star_elastic.serve.proxy import Backend, ProxyEngine

    router = Router(cfg, [])
    engine = ProxyEngine(Backend.parse(think_backend, "--think-backend"),
                         Backend.parse(answer_backend, "--answer-backend"), tokenizer, backend_api_key)
    return build_app(engine, router)


def app_for(cfg: ServeConfig) -> FastAPI:
    """`star-elastic serve`: the app over a run or checkpoint in this process, or over two backends."""
    from star_elastic.slicing import checkpoint_dir

    if cfg.think_backend or cfg.answer_backend:
        if not (cfg.think_backend and cfg.answer_backend and cfg.run):
            raise ConfigError("serve: a proxy needs --think-backend, --answer-backend and RUN (for its tokenizer)")
        if cfg.arch_file or cfg.device != "auto":
            raise ConfigError("serve: a proxy runs no model here: its backends choose the architectures and devices; "
                              "drop --arch-file / --device")
        from transformers import AutoTokenizer

        model_dir = checkpoint_dir(cfg.run)
        if not (model_dir / "tokenizer.json").is_file():
            raise ConfigError(f"serve: {model_dir} has no tokenizer.json (the proxy formats prompts with it)")
        return make_proxy_app(cfg.think_backend, cfg.answer_backend, AutoTokenizer.from_pretrained(str(model_dir)),
                              cfg, cfg.backend_api_key)
    if not cfg.run:
        raise ConfigError("serve: give an elastic run folder (or --think-backend and --answer-backend)")
    return make_local_app(open_server(cfg.run, cfg.arch_file, cfg.device), cfg)
