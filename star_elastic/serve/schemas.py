"""Request and response bodies of the OpenAI API subset we serve, validated by pydantic (unknown
fields → 400). The response models document the JSON the routes build (the OpenAPI schema at
/openapi.json); they are not run on each response.

Budget control rides in the body (the openai client's `extra_body`): `think_budget`,
`answer_budget`, `max_think_tokens`, or vLLM's name for the cap, `thinking_token_budget`.

Bounds, each a 400 naming the field past it: text fields take any Unicode text but NUL and lone
surrogates (the tokenizer takes neither); `seed` is in [0, 2**63 - 1] (torch's generator takes 64
bits; choice i of a request with `n` > 1 uses seed + i, wrapped into that range); `n` is in
[1, MAX_N] and prompts × n at most MAX_CHOICES; `logprobs` (completions) and `top_logprobs` (chat)
are in [0, MAX_LOGPROBS], as OpenAI's. A temperature below GREEDY_BELOW decodes greedily (as vLLM).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      model_validator)

from star_elastic.serve.errors import RequestError

MAX_SEED = 2**63 - 1
MAX_N = 16
MAX_CHOICES = 64
MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5

Number = Annotated[StrictFloat, Field(allow_inf_nan=False)] | StrictInt  # JSON numbers only: "0.5" is a type error


def _tokenizable(text: str) -> str:
    """Text the tokenizer can take: no NUL, no lone surrogate (JSON can carry both as \\u escapes)."""
    if "\x00" in text:
        raise ValueError("contains NUL (\\u0000), which the tokenizer cannot take")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (\\ud800-\\udfff without its pair): not Unicode text") from None
    return text


# /openapi.json documents the NUL rule as a pattern (for the schema only: pydantic's regex engine is not
# needed twice); lone surrogates are left out of it, as JSON Schema tools cannot draw or negate them.
TEXT_PATTERN = r"^[^\u0000]*$"
Text = Annotated[StrictStr, AfterValidator(_tokenizable), Field(json_schema_extra={"pattern": TEXT_PATTERN})]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]  # below the vocabulary size


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class BaseRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[Text, Field(max_length=256)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    """Cap on answer tokens (the trace has its own cap, `max_think_tokens`)."""
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    """Below 1e-5: greedy."""
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    """Sampling seed in [0, 2**63 - 1]; choice i (n > 1) uses (seed + i) mod 2**63."""
    stop: Annotated[Text, Field(min_length=1)] | Annotated[list[Annotated[Text, Field(min_length=1)]],
                                                          Field(max_length=4)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    """Independent choices per prompt."""
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    skip_special_tokens: StrictBool = True
    """vLLM's flag: False keeps `</think>` in returned text (the budget proxy sends False)."""
    think_budget: Number | Text | None = None
    """A trained budget (fraction), or the name of an explicit architecture where the server has them."""
    answer_budget: Number | Text | None = None
    max_think_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    thinking_token_budget: Annotated[StrictInt, Field(ge=0)] | None = None
    """vLLM's name for `max_think_tokens`."""

    @model_validator(mode="after")
    def _one_cap(self):
        if self.max_think_tokens is not None and self.thinking_token_budget is not None \
                and self.max_think_tokens != self.thinking_token_budget:
            raise ValueError("give max_think_tokens or thinking_token_budget, not two different values")
        return self

    def check(self) -> None:
        """Rules across fields, each a 400 naming the field to change."""
        if self.stream and self.n > 1:
            raise RequestError("n: stream one choice per request (n = 1)", param="n")
        if self.stream and self.top_logprobs_k() is not None:
            raise RequestError("logprobs: log-probabilities come with non-streaming requests only", param="logprobs")

    def think_cap(self) -> int | None:
        return self.max_think_tokens if self.max_think_tokens is not None else self.thinking_token_budget

    def stops(self) -> tuple[str, ...]:
        return tuple([self.stop] if isinstance(self.stop, str) else list(self.stop or []))

    def top_logprobs_k(self) -> int | None:
        """How many alternatives per token the response lists; None: no log-probabilities."""
        raise NotImplementedError


class CompletionRequest(BaseRequest):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)] | TokenIds \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]
    """Text, a list of texts, one prompt as token ids, or a list of token-id prompts (choices n per prompt)."""
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    """Cap on answer tokens; 0 with `echo` and `logprobs` scores the prompt only."""
    echo: StrictBool | None = False
    """Return the prompt before the text (and, with `logprobs`, its tokens' log-probabilities)."""
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """Each token's log-probability and the `logprobs` most likely alternatives' (legacy format)."""

    def check(self) -> None:
        super().check()
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise RequestError(f"n: prompts × n is at most {MAX_CHOICES}, got {len(self.prompts())} × {self.n}",
                               param="n")
        if self.stream and self.echo:
            raise RequestError("echo: echoed prompts come with non-streaming requests only", param="echo")

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def top_logprobs_k(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]
    reasoning_content: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    """OpenAI's newer name for `max_tokens`."""
    logprobs: StrictBool | None = False
    """Return each generated token's log-probability (reasoning and content apart)."""
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """With `logprobs`: the most likely alternatives listed per token."""

    @model_validator(mode="after")
    def _last_is_user(self):
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        if not self.messages[-1].text().strip():
            raise ValueError("the last user message is empty")
        return self

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true", param="top_logprobs")

    def answer_cap(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# --- responses (documentation: /openapi.json) -------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class UsageDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    """Reasoning (with its closing token) and answer tokens."""
    total_tokens: int
    completion_tokens_details: UsageDetails


class LogprobRange(BaseModel):
    """Which budget's model gave the log-probabilities of a range of tokens."""

    part: Literal["prompt", "reasoning", "answer"]
    budget: float | str
    start: int
    """First index of the range in its list (completions: `logprobs.tokens`; chat: `logprobs.reasoning_content`
    for part "reasoning", `logprobs.content` for part "answer")."""
    end: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format: per token its text, log-probability (null: the first prompt token, a
    `</think>` forced at the cap), the top alternatives (text → log-probability, the token's own
    included) and the offset of its text in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Finish(BaseModel):
    finish_reason: str | None
    """Either "stop" (eos or a stop string) or "length" (max_tokens)."""
    stop_reason: str | None
    """The stop string that ended the answer, if one did."""
    forced_end_of_think: bool | None
    """True when `</think>` was forced at the think cap; null without a think phase."""


class CompletionChoice(Finish):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    logprob_budgets: list[LogprobRange] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    """The answer's tokens (eos excepted), the answer budget's log-probabilities."""
    reasoning_content: list[TokenLogprob]
    """The trace's tokens (its closing token excepted), the think budget's log-probabilities."""
    refusal: None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str
    reasoning_content: str


class ChatChoice(Finish):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    logprob_budgets: list[LogprobRange] | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelEntry(BaseModel):
    """The elastic model (its default budgets) or one budget of it (NAME@B) with its costs."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    think_budget: float | str | None = None
    answer_budget: float | str | None = None
    parent: str | None = None
    budget: float | str | None = None
    total_params: int | None = None
    active_params: int | None = None
    active_params_ratio: float | None = None
    """Active parameters over the parent's."""
    budget_type: str | None = None
    target: float | None = None
    achieved: float | None = None
    """The relative cost (in `budget_type`) the router's choice achieves, against `target`."""


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class Health(BaseModel):
    status: Literal["ok"]
