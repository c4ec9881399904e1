"""Request bodies of the OpenAI API subset we serve, validated by pydantic (unknown fields → 400).

Budget control rides in the body (the openai client's `extra_body`): `think_budget`,
`answer_budget`, `max_think_tokens`, or vLLM's name for the cap, `thinking_token_budget`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

Number = StrictFloat | StrictInt  # JSON numbers only: "0.5" as a string is a type error


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class BaseRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    """Cap on answer tokens (the trace has its own cap, `max_think_tokens`)."""
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    n: Literal[1] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    skip_special_tokens: StrictBool = True
    """vLLM's flag: False keeps `</think>` in returned text (the budget proxy sends False)."""
    think_budget: Number | StrictStr | None = None
    """A trained budget (fraction), or the name of an explicit architecture where the server has them."""
    answer_budget: Number | StrictStr | None = None
    max_think_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    thinking_token_budget: Annotated[StrictInt, Field(ge=0)] | None = None
    """vLLM's name for `max_think_tokens`."""

    @model_validator(mode="after")
    def _one_cap(self):
        if self.max_think_tokens is not None and self.thinking_token_budget is not None \
                and self.max_think_tokens != self.thinking_token_budget:
            raise ValueError("give max_think_tokens or thinking_token_budget, not two different values")
        if any(s == "" for s in self.stops()):
            raise ValueError("stop strings must not be empty")
        return self

    def think_cap(self) -> int | None:
        return self.max_think_tokens if self.max_think_tokens is not None else self.thinking_token_budget

    def stops(self) -> tuple[str, ...]:
        return tuple([self.stop] if isinstance(self.stop, str) else list(self.stop or []))


class CompletionRequest(BaseRequest):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=64)] \
        | Annotated[list[StrictInt], Field(min_length=1)]
    """Text, a list of texts (one choice each), or one prompt as token ids."""
    echo: Literal[False] = False
    logprobs: None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)]
    reasoning_content: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    """OpenAI's newer name for `max_tokens`."""

    @model_validator(mode="after")
    def _last_is_user(self):
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        if not self.messages[-1].text().strip():
            raise ValueError("the last user message is empty")
        return self

    def answer_cap(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
