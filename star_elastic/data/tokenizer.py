"""The demo tokenizer: character level over a fixed alphabet, built with HF `tokenizers`.

ids 0, 1, 2 are <pad>, <s>, </s> (Nemotron-H's pad / bos / eos defaults); <unk> is 3; the think
markers (4, 5) and chat roles (6, 7) are single tokens. The chat roles are special; `<think>` and
`</think>` are ordinary added tokens, as in Qwen3's tokenizer, so `decode(skip_special_tokens=True)`
(lm-eval, pipelines, vLLM's default detokenizer) keeps the marker that separates trace from answer.
Decoding concatenates tokens, so decode(encode(text)) == text for every text over the alphabet.
The chat template renders
    [SYSTEM]<|user|>PROMPT<|assistant|><think>TRACE</think>ANSWER</s>
(a system message, if any, as plain text before the first user turn; an unknown role is an error),
and, for generation, stops after `<|assistant|><think>` so the model starts inside its trace.
An assistant turn's `reasoning_content` is rendered as `<think>REASONING</think>` before its content
(every turn's, none dropped), its `tool_calls` as ` call:NAME(ARGUMENTS)` after it; a tool result
is a user-side turn `<|user|>tool:RESULT`, and `tools` are listed by name first, `tools:A,B.` (the
vocabulary stays the demo parent's: no new tokens).
The tokenizer pads on the left, as batched generation needs.
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from star_elastic.config import ConfigError

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<think>", "</think>", "<|user|>", "<|assistant|>"]
THINK_MARKERS = ("<think>", "</think>")  # added tokens, not special: decoding never drops them
ALPHABET = string.digits + string.ascii_lowercase + " +-*=?|.,:()<>"
MODEL_MAX_LENGTH = 4096  # ModelConfig.max_position_embeddings' default; the demo trains on 128-token rows
CHAT_TEMPLATE = (
    "{% if tools %}tools:{% for t in tools %}{{ t['function']['name'] }}{{ ',' if not loop.last }}{% endfor %}.{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and loop.first %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% if m['reasoning_content'] %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %} call:{{ c['function']['name'] }}("
    "{{ c['function']['arguments'] if c['function']['arguments'] is string else c['function']['arguments'] | tojson }})"
    "{% endfor %}</s>"
    "{% elif m['role'] == 'tool' %}<|user|>tool:{{ m['content'] }}"
    "{% else %}{{ raise_exception('unsupported chat role ' ~ m['role'] ~ ': use system (first), user, assistant or tool') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in ALPHABET:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([t for t in SPECIALS if t not in THINK_MARKERS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_MARKERS])  # ids stay 4, 5
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"], clean_up_tokenization_spaces=False,
        padding_side="left", model_max_length=MODEL_MAX_LENGTH,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def check_text(text: str) -> None:
    """Raise for characters outside the alphabet (they would become <unk>)."""
    bad = sorted({c for c in text if c not in ALPHABET} - set("".join(SPECIALS)))
    if bad:
        raise ConfigError(f"text has characters outside the tokenizer's alphabet: {bad}")


def format_prompt(tok, prompt: str) -> str:
    """The text a model continues: user turn, then the assistant prefix ending in <think>."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def format_example(tok, example: dict) -> str:
    """Full training text: prompt, trace, </think>, answer, eos."""
    return format_prompt(tok, example["prompt"]) + example["think"] + "</think>" + example["answer"] + "</s>"


def encode_example(tok, example: dict) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): the mask is 1 on the assistant's trace, </think>, answer and eos."""
    check_text(example["prompt"] + example["think"] + example["answer"])
    head = tok.encode(format_prompt(tok, example["prompt"]), add_special_tokens=False)
    tail = tok.encode(example["think"] + "</think>" + example["answer"] + "</s>", add_special_tokens=False)
    return head + tail, [0] * len(head) + [1] * len(tail)
