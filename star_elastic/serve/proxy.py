"""Budget control over any OpenAI-compatible backends (vLLM serving two slices, or our own server).

Phase 1 is a completion on the think backend: the formatted prompt, `max_tokens` = the think cap,
`stop: ["</think>"]` and `skip_special_tokens: false` (vLLM strips `</think>` from text otherwise,
and a stop on it would never match). A trace that hit the cap is closed with `</think>` by us.
Phase 2 sends prompt + trace + `</think>` to the answer backend as a new completion: the answer
backend prefills the whole trace again. The in-process server pays that prefill too (the answer
budget's submodel cannot reuse the think submodel's state); the proxy adds HTTP, JSON and
re-tokenization (measured in benchmarks/bench_server.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx

from star_elastic.config import ConfigError
from star_elastic.serve.engine import Progress, Spec, chat_prompt
from star_elastic.serve.errors import RequestError


@dataclasses.dataclass
class Backend:
    """An OpenAI-compatible server: its /v1 base URL and the model id to ask for."""

    base_url: str
    model: str | None

    @classmethod
    def parse(cls, text: str, flag: str) -> Backend:
        """'http://host:port[/v1][#model]' → Backend (model None: the backend's first listed model)."""
        url, _, model = text.partition("#")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"serve: {flag} {text!r} is not an http(s) URL (URL[#model])")
        url = url.rstrip("/")
        return cls(url if url.endswith("/v1") else url + "/v1", model or None)


class ProxyEngine:
    """The Engine interface (check, chat_prompt, run) over two backends, with httpx."""

    def __init__(self, think: Backend, answer: Backend, tokenizer, api_key: str | None = None,
                 timeout_s: float = 600.0):
        self.think, self.answer, self.tokenizer = think, answer, tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=timeout_s)

    def failure(self) -> str | None:
        return None  # each backend reports its own health

    def check(self, spec: Spec) -> None:
        if not isinstance(spec.prompt, str):
            raise RequestError("the proxy takes text prompts, not token ids", param="prompt")
        if spec.sampling.logprobs is not None:
            raise RequestError("the proxy returns no log-probabilities (serve the run itself for them)",
                               param="logprobs")

    def chat_prompt(self, messages: list[dict]) -> str:
        return chat_prompt(self.tokenizer, messages)

    def close(self) -> None:
        pass  # the client is closed by aclose() in the app's lifespan

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _model(self, backend: Backend) -> str:
        if backend.model is None:
            listed = await self._call("GET", backend, "/models")
            backend.model = listed["data"][0]["id"]
        return backend.model

    async def _call(self, method: str, backend: Backend, path: str, body: dict | None = None) -> dict:
        try:
            r = await self.client.request(method, backend.base_url + path, json=body)
        except httpx.HTTPError as err:
            raise RequestError(f"backend {backend.base_url} unreachable: {type(err).__name__}", status=502) from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            status = r.status_code if r.status_code < 500 else 502
            raise RequestError(f"backend {backend.base_url}: {message}", status=status)
        return r.json()

    async def _complete(self, backend: Backend, prompt: str, max_tokens: int, spec: Spec, stop: list[str],
                        skip_special: bool) -> dict:
        body = {"model": await self._model(backend), "prompt": prompt, "max_tokens": max_tokens,
                "temperature": spec.sampling.temperature, "top_p": spec.sampling.top_p,
                "skip_special_tokens": skip_special}
        if stop:
            body["stop"] = stop
        if spec.sampling.seed is not None:
            body["seed"] = spec.sampling.seed
        return await self._call("POST", backend, "/completions", body)

    async def run(self, spec: Spec, partial: bool = True) -> AsyncIterator[Progress]:
        self.check(spec)
        prog, prompt = Progress(), spec.prompt
        if spec.think_budget is not None:
            prompt = await self._think(spec, prog)
            if partial:
                yield prog
        r = await self._complete(self.answer, prompt, spec.max_tokens, spec, list(spec.sampling.stop_strings),
                                 spec.skip_special_tokens)
        choice = r["choices"][0]
        prog.content, prog.content_tokens = choice["text"], r["usage"]["completion_tokens"]
        prog.prompt_tokens = prog.prompt_tokens or r["usage"]["prompt_tokens"]
        prog.finish = choice["finish_reason"]
        yield prog

    async def _think(self, spec: Spec, prog: Progress) -> str:
        """Run phase 1; fill prog's reasoning; return the answer backend's prompt."""
        trace, closer, tokens = "", "</think>", 0
        prog.forced_end_of_think = True
        if spec.max_think_tokens > 0:
            r = await self._complete(self.think, spec.prompt, spec.max_think_tokens, spec, ["</think>"], False)
            choice = r["choices"][0]
            trace, tokens = choice["text"], r["usage"]["completion_tokens"]
            prog.prompt_tokens = r["usage"]["prompt_tokens"]
            if choice["finish_reason"] == "stop":  # the model closed its trace: </think>, or eos
                prog.forced_end_of_think = False
                if choice.get("stop_reason") is None:
                    closer = self.tokenizer.eos_token
        prog.reasoning = trace
        prog.reasoning_tokens = tokens + (1 if prog.forced_end_of_think else 0)
        return spec.prompt + trace + closer
