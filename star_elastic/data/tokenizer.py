"""The demo tokenizer: character level over a fixed alphabet, built with HF `tokenizers`.

ids 0, 1, 2 are <pad>, <s>, </s> (Nemotron-H's pad / bos / eos defaults); <unk> is 3; the think
markers and chat roles are single special tokens. Decoding concatenates tokens, so
decode(encode(text)) == text for every text over the alphabet. The chat template renders
    <|user|>PROMPT<|assistant|><think>TRACE</think>ANSWER</s>
and, for generation, stops after `<|assistant|><think>` so the model starts inside its trace.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from star_elastic.config import ConfigError

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<think>", "</think>", "<|user|>", "<|assistant|>"]
ALPHABET = string.digits + string.ascii_lowercase + " +-*=?|.,:()<>"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}</s>{% endif %}"
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
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:], clean_up_tokenization_spaces=False,
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
