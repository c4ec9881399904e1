"""Synthetic reasoning data and the character tokenizer, against independent recomputation."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from star_elastic.config import ConfigError
from star_elastic.data import synthetic
from star_elastic.data.tokenizer import build_tokenizer, encode_example, format_example, format_prompt


def test_generation_is_deterministic_and_seed_dependent():
    assert synthetic.generate(200, seed=5) == synthetic.generate(200, seed=5)
    assert synthetic.generate(200, seed=5) != synthetic.generate(200, seed=6)


def test_splits_are_disjoint_and_cover_every_family_and_level():
    s = synthetic.make_splits(3000, 200, 300, seed=0)
    train = {ex["prompt"] for ex in s["train"]}
    val, test = {ex["prompt"] for ex in s["val"]}, {ex["prompt"] for ex in s["test"]}
    assert len(s["val"]) == 200 and len(s["test"]) == 300
    assert not (train & test) and not (train & val) and not (val & test)
    assert {(ex["family"], ex["level"]) for ex in s["test"]} == {(f, lv) for f in synthetic.FAMILIES for lv in (1, 2, 3)}
    assert synthetic.make_splits(3000, 200, 300, seed=0) == s


def independent_answer(ex: dict) -> str:
    """Recompute the answer from the prompt alone."""
    p = ex["prompt"]
    if ex["family"] == "arith":  # "(7+5-3)*2="
        inner, k = re.fullmatch(r"\((.*)\)\*(\d)=", p).groups()
        return str(sum(int(t) for t in re.findall(r"[+-]?\d", inner)) * int(k))
    if ex["family"] == "rev":  # "rev+2 3 8 1"
        head, *items = p.split()
        return " ".join(str((int(d) + int(head[4:])) % 10) for d in items[::-1])
    env: dict[str, int] = {}
    for d in p.split()[:-1]:
        name, expr = d.split("=")
        env[name] = eval(expr, {}, dict(env))  # expressions like "b*2" over earlier names only
    return str(eval(p.split()[-1].rstrip("?"), {}, env))


def test_answers_are_correct_and_need_a_step_beyond_the_trace():
    exs = synthetic.generate(3000, seed=1)
    for ex in exs:
        assert ex["answer"] == independent_answer(ex), ex
    # the answer is not the trace's last value (it applies one more operation), except 0 * k = 0
    copied = [ex["answer"] for ex in exs if ex["answer"] == re.split(r"[=|] ?", ex["think"])[-1].strip()]
    assert set(copied) <= {"0"} and len(copied) / len(exs) < 0.02
    ratio = sum(len(ex["think"]) for ex in exs) / sum(len(ex["answer"]) for ex in exs)
    assert ratio >= 4


def test_levels_lengthen_the_chain():
    for family in synthetic.FAMILIES:
        cfg = synthetic.TaskConfig(families=(family,), levels=(1,))
        hard = synthetic.TaskConfig(families=(family,), levels=(3,))
        easy_len = sum(len(e["think"]) for e in synthetic.generate(200, 0, cfg))
        hard_len = sum(len(e["think"]) for e in synthetic.generate(200, 0, hard))
        assert hard_len > 1.4 * easy_len


def test_tokenizer_round_trip_special_ids_and_save_load(tmp_path):
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for special in ("<think>", "</think>", "<|user|>", "<|assistant|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    exs = synthetic.generate(2000, seed=2)
    for ex in exs:
        text = format_example(tok, ex)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for ex in exs[:200]:
        text = format_example(tok, ex)
        assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_chat_template_and_loss_mask():
    tok = build_tokenizer()
    ex = {"family": "arith", "level": 1, "prompt": "1+2+3=", "think": "1+2=3 3+3=6", "answer": "6"}
    assert format_prompt(tok, ex["prompt"]) == "<|user|>1+2+3=<|assistant|><think>"
    full = tok.apply_chat_template([{"role": "user", "content": ex["prompt"]},
                                    {"role": "assistant", "content": "<think>1+2=3 3+3=6</think>6"}], tokenize=False)
    assert full == format_example(tok, ex)
    ids, mask = encode_example(tok, ex)
    assistant = tok.decode([i for i, m in zip(ids, mask) if m])
    assert assistant == "1+2=3 3+3=6</think>6</s>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == "<|user|>1+2+3=<|assistant|><think>"


def test_answer_parsing_and_errors():
    assert synthetic.check_answer("<think>1+2=3</think>3</s>", "3")
    assert synthetic.check_answer("<think>a</think> 5 2 </s><pad>", "5 2")
    assert not synthetic.check_answer("<think>1+2=3 3+4=7", "7")  # trace never ended
    assert not synthetic.check_answer("<think>x</think>71</s>", "7")
    with pytest.raises(ConfigError, match="unknown task family 'sum'"):
        synthetic.TaskConfig(families=("sum",))
    with pytest.raises(ConfigError, match=r"outside the tokenizer's alphabet: \['#'\]"):
        encode_example(build_tokenizer(), {"prompt": "1#2", "think": "", "answer": "3"})
