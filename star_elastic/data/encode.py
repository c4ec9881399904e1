"""One record → training samples (ids, loss mask).

Record kinds (a record holds exactly one of these keys):
  messages   OpenAI-style turns (system / user / assistant / tool) and optional `tools`; an
             assistant turn may carry `reasoning_content`. Rendered by the tokenizer's own chat
             template; the loss covers the assistant's tokens (its reasoning included), nothing else.
  text       every token in the loss (the tokenizer's eos appended, unless told otherwise).
  input_ids  pre-tokenized ids (no tokenizer needed), checked against the vocabulary size;
             an optional `loss_mask` (0/1, same length) says which count, else all.

How the chat mask is found, for any template, by rendering prefixes: assistant turn a's text ends
where the rendering of messages[:a+1] ends, and starts where that rendering stops agreeing with the
rendering of messages[:a] plus the generation prompt (right after the prompt when that is a prefix
of it; so the demo template's `<think>` opener, part of its prompt, is not in the loss).
A template that drops earlier turns' reasoning (Qwen3 / Nemotron style: only the last turn keeps
its <think>) is detected by rendering: some "conversation up to a" is then not a prefix of the
whole rendering. Such a conversation becomes one sample per assistant turn (the conversation up to
that turn, the loss on that turn only), as NVIDIA's SFT preparation does. Character spans become
token spans through the tokenizer's offsets: every token that overlaps an assistant span is in the loss.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
KINDS = ("messages", "text", "input_ids")

Sample = tuple[np.ndarray, np.ndarray]  # ids (n,) uint32, loss mask (n,) bool


class RecordError(ValueError):
    """A record that cannot become samples; the caller prefixes its `path:LINE`."""


@dataclasses.dataclass
class Encoder:
    """Turns records into samples. Picklable (it is sent to the tokenizing workers)."""

    tokenizer: object | None
    """A transformers fast tokenizer, or None when every record is input_ids."""
    vocab_size: int | None
    """input_ids must lie in [0, vocab_size)."""
    append_eos: bool = True
    """Append the tokenizer's eos to text records (documents end in eos, as in pretraining)."""

    def __call__(self, payload: bytes | dict) -> list[Sample]:
        rec = parse(payload)
        kinds = [k for k in KINDS if rec.get(k) is not None]  # parquet rows hold every column, None where unset
        if len(kinds) != 1:
            found = sorted(k for k, v in rec.items() if v is not None)
            raise RecordError(f"a record needs exactly one of {list(KINDS)} (found keys {found})")
        if kinds[0] == "input_ids":
            return [self.input_ids(rec)]
        if self.tokenizer is None:
            raise RecordError(f"'{kinds[0]}' records need a tokenizer: give --tokenizer MODEL_DIR")
        return self.messages(rec) if kinds[0] == "messages" else [self.text(rec)]

    def input_ids(self, rec: dict) -> Sample:
        if self.vocab_size is None:
            raise RecordError("'input_ids' records need the vocabulary size: give --vocab-size, or --tokenizer "
                              "MODEL_DIR (its config.json's vocab_size)")
        ids = _int_array(rec["input_ids"], "input_ids")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise RecordError(f"'input_ids' has id {bad} outside the vocabulary (size {self.vocab_size})")
        mask = np.ones(ids.size, dtype=bool)
        if rec.get("loss_mask") is not None:
            mask = _int_array(rec["loss_mask"], "loss_mask")
            if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
                raise RecordError(f"'loss_mask' must be {ids.size} zeros and ones, like 'input_ids'")
            mask = mask.astype(bool)
        return _checked(ids.astype(np.uint32), mask)

    def text(self, rec: dict) -> Sample:
        if not isinstance(rec["text"], str):
            raise RecordError(f"'text' must be a string, got {type(rec['text']).__name__}")
        eos = self.tokenizer.eos_token if self.append_eos and self.tokenizer.eos_token else ""
        ids = self.tokenizer.encode(rec["text"] + eos, add_special_tokens=False, verbose=False)
        return _checked(np.asarray(ids, dtype=np.uint32), np.ones(len(ids), dtype=bool))

    def messages(self, rec: dict) -> list[Sample]:
        msgs, tools = _checked_messages(rec)
        render = _Renderer(self.tokenizer, tools)
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        upto = {a: render(msgs[: a + 1]) for a in turns}  # the conversation up to and including turn a
        spans = {a: (_common_prefix(render.prompt(msgs[:a]), upto[a]), len(upto[a])) for a in turns}
        whole = render(msgs)
        if all(whole.startswith(upto[a]) for a in turns):
            return [self._masked(whole, list(spans.values()))]
        return [self._masked(upto[a], [spans[a]]) for a in turns]  # the template drops earlier turns' text

    def _masked(self, text: str, spans: list[tuple[int, int]]) -> Sample:
        """Tokenize `text`; the mask is 1 on every token overlapping one of the character spans."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (n, 2) chars [start, end)
        starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
        mask = np.zeros(len(offsets), dtype=bool)
        for lo, hi in spans:
            mask |= (starts < hi) & (ends > lo)
        return _checked(np.asarray(enc["input_ids"], dtype=np.uint32), mask)


class _Renderer:
    """The tokenizer's chat template as a function of a message list; template errors → RecordError."""

    def __init__(self, tokenizer, tools):
        self.tokenizer, self.tools = tokenizer, tools

    def __call__(self, msgs: list[dict], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(msgs, tools=self.tools, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2 raises several types; the template's own raise_exception among them
            raise RecordError(f"the chat template cannot render this conversation ({type(err).__name__}: {err})") from None

    def prompt(self, msgs: list[dict]) -> str:
        """What a model continues from after `msgs`: the rendering with the generation prompt."""
        if not msgs:  # a conversation that opens with the assistant; some templates cannot render []
            try:
                return self([], generation_prompt=True)
            except RecordError:
                return ""
        return self(msgs, generation_prompt=True)


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (the usual case, `a` a prefix of `b`, in one C call)."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo], a[:hi+1] != b[:hi+1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def parse(payload: bytes | dict) -> dict:
    """A jsonl line's bytes or a parquet row → the record dict."""
    if isinstance(payload, dict):
        return payload
    try:
        rec = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecordError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object per line, got {type(rec).__name__}")
    return rec


def _checked_messages(rec: dict) -> tuple[list[dict], list | None]:
    msgs, tools = rec["messages"], rec.get("tools")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RecordError(f"messages[{i}]: needs a role among {list(ROLES)}")
        if not isinstance(m.get("content"), str) and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise RecordError(f"messages[{i}] ({m['role']}): 'content' must be a string")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and (m["role"] != "assistant" or not isinstance(reasoning, str)):
            raise RecordError(f"messages[{i}] ({m['role']}): 'reasoning_content' must be a string on an assistant turn")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RecordError("'messages' has no assistant turn: nothing to train on")
    if tools is not None and not isinstance(tools, list):
        raise RecordError("'tools' must be a list")
    return msgs, tools


def _int_array(values, key: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise RecordError(f"'{key}' must be a list of integers")
    return arr.astype(np.int64)


def _checked(ids: np.ndarray, mask: np.ndarray) -> Sample:
    if ids.size == 0:
        raise RecordError("the record has no tokens")
    return ids, mask


# --- worker processes -----------------------------------------------------------------------
_WORKER: Encoder | None = None


def init_worker(encoder: Encoder) -> None:
    """Pool initializer: keep the encoder (with its tokenizer) for this process's chunks."""
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core: no thread pools on top
    _WORKER = encoder


def encode_chunk(encoder: Encoder, chunk: list[tuple[int, str, bytes | dict]]) -> list[tuple[int, str, list[Sample] | str]]:
    """(source, where, payload) records → (source, where, samples or the error message)."""
    out = []
    for source, where, payload in chunk:
        try:
            out.append((source, where, encoder(payload)))
        except RecordError as err:
            out.append((source, where, str(err)))
    return out


def worker_chunk(chunk):
    """`encode_chunk` with this worker process's encoder."""
    return encode_chunk(_WORKER, chunk)
