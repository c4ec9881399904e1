"""What a transformers user gets from a saved slice: tokenizer flags, chat template, generation defaults."""

from __future__ import annotations

import jinja2
import pytest
import torch
import transformers
from conftest import tiny_elastic
from transformers import AutoTokenizer, GenerationConfig

from star_elastic import hf, load_model
from star_elastic.config import ConfigError
from star_elastic.data import synthetic
from star_elastic.data.tokenizer import build_tokenizer, format_example
from star_elastic.elastic.arch import slice_model
from star_elastic.hf import save_model


@pytest.fixture(scope="module")
def saved_slice(tmp_path_factory):
    elastic = tiny_elastic()
    small = slice_model(elastic.model, elastic.architecture(0.5))
    small.tokenizer = build_tokenizer()
    path = tmp_path_factory.mktemp("slice")
    save_model(small, path)
    return path


def test_skip_special_tokens_keeps_the_think_markers(saved_slice):
    tok = AutoTokenizer.from_pretrained(saved_slice)
    ex = {"prompt": "1+2+3=", "think": "1+2=3 3+3=6", "answer": "6"}
    ids = tok.encode(format_example(tok, ex), add_special_tokens=False)
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [4, 5]  # ids unchanged
    assert tok.decode(ids, skip_special_tokens=True) == "1+2+3=<think>1+2=3 3+3=6</think>6"  # roles, eos dropped
    assert synthetic.check_answer(tok.decode(ids, skip_special_tokens=True) + "</s>", "6")


def test_padding_length_and_generation_defaults_as_transformers_reads_them(saved_slice):
    tok = AutoTokenizer.from_pretrained(saved_slice)
    assert tok.padding_side == "left" and tok.model_max_length == 4096
    batch = tok(["1+2=", "12+34+5="], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:4] == [tok.pad_token_id] * 4  # left padded
    gen = GenerationConfig.from_pretrained(saved_slice)
    # a bare generate() must have room for a demo prompt, whole trace, answer and eos (transformers' default is 20)
    longest = max(len(tok.encode(format_example(tok, ex), add_special_tokens=False)) for ex in synthetic.generate(500, seed=0))
    assert gen.max_length >= longest > 20
    model = transformers.AutoModelForCausalLM.from_pretrained(saved_slice).eval()
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    with torch.no_grad():  # eos_token_id=None: no stop, the length settings alone decide
        bare = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None)
        capped = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, max_length=ids.shape[1] + 7)
        new = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, max_new_tokens=5)
    assert bare.shape[1] == gen.max_length
    assert capped.shape[1] == ids.shape[1] + 7  # a caller's max_length (lm-eval's max_gen_toks) wins
    assert new.shape[1] == ids.shape[1] + 5


def test_chat_template_keeps_a_system_message_and_rejects_unknown_roles():
    tok = build_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "be brief<|user|>1+2=<|assistant|><think>"
    with pytest.raises(jinja2.TemplateError, match="unsupported chat role critic"):
        tok.apply_chat_template([{"role": "critic", "content": "x"}], tokenize=False)


def test_transformers_4_gets_a_one_line_message(saved_slice, monkeypatch):
    monkeypatch.setattr(hf, "_transformers_version", lambda: "4.57.1")
    with pytest.raises(ConfigError, match=r"transformers 4.57.1 is installed; nemotron_h checkpoints need transformers >= 5"):
        load_model(saved_slice)
