"""The token store (prepare-data) against independent re-computation: chat loss masks checked token
by token by a parser of the rendered text, stores read back against the records, a killed writer,
bad records by file and line, 2 workers against 1."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from star_elastic.config import ConfigError
from star_elastic.data import synthetic
from star_elastic.data.encode import Encoder
from star_elastic.data.store import PrepareConfig, TokenStore, prepare_data, write_synthetic_store
from star_elastic.data.tokenizer import build_tokenizer, encode_example

# Qwen3-like: an assistant turn keeps its <think> only after the last user turn (earlier reasoning
# is dropped), over the demo tokenizer's tokens; the generation prompt is just <|assistant|>.
DROPPING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}<|user|>{{ m['content'] }}"
    "{%- elif m['role'] == 'tool' -%}<|user|>tool:{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}<|assistant|>"
    "{%- if m['reasoning_content'] and loop.index0 > ns.last_user -%}<think>{{ m['reasoning_content'] }}</think>{%- endif -%}"
    "{{ m['content'] }}</s>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "1+2=?"},
    {"role": "assistant", "content": "3", "reasoning_content": "1+2=3"},
    {"role": "user", "content": "times 4?"},
    {"role": "assistant", "content": "", "reasoning_content": "use calc",
     "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": "3*4"}}]},
    {"role": "tool", "content": "12"},
    {"role": "assistant", "content": "12"},
]
TOOLS = [{"type": "function", "function": {"name": "calc"}}]


def assistant_mask(tok, ids, think_in_prompt: bool, last_only: bool = False) -> list[bool]:
    """The reference mask, from the token sequence alone: every token after <|assistant|> up to and
    including its </s>; a <think> right after <|assistant|> is the generation prompt's when the
    template's prompt ends in it. `last_only`: only the last assistant turn."""
    words = tok.convert_ids_to_tokens(list(ids))
    turn_of, inside, turn = [], False, -1  # per token: the assistant turn it belongs to, or None
    for i, w in enumerate(words):
        if w == "<|assistant|>":
            inside, turn = True, turn + 1
            turn_of.append(None)
            continue
        prompt_think = think_in_prompt and w == "<think>" and words[i - 1] == "<|assistant|>"
        turn_of.append(turn if inside and not prompt_think else None)
        inside = inside and w != "</s>"
    return [t is not None and (not last_only or t == turn) for t in turn_of]


def dropping_tokenizer():
    tok = build_tokenizer()
    tok.chat_template = DROPPING_TEMPLATE
    return tok


def test_multi_turn_mask_covers_exactly_the_assistant_turns_reasoning_included():
    tok = build_tokenizer()
    [(ids, mask)] = Encoder(tok, None).messages({"messages": CONVERSATION, "tools": TOOLS})
    rendered = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    assert tok.decode(ids.tolist()) == rendered  # one sample: this template keeps every turn's reasoning
    assert "<think>1+2=3</think>3</s>" in rendered and "<think>use calc</think> call:calc(3*4)</s>" in rendered
    assert mask.tolist() == assistant_mask(tok, ids, think_in_prompt=True)
    assert tok.decode(ids[mask].tolist()) == "1+2=3</think>3</s>use calc</think> call:calc(3*4)</s>12</s>"


def test_a_template_that_drops_earlier_reasoning_gives_one_sample_per_assistant_turn():
    tok = dropping_tokenizer()
    msgs = CONVERSATION[1:5] + [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "12",
                                                                     "reasoning_content": "12"}]
    samples = Encoder(tok, None).messages({"messages": msgs})
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    assert len(samples) == len(turns) == 3
    for (ids, mask), a in zip(samples, turns):
        rendered = tok.apply_chat_template(msgs[: a + 1], tokenize=False)  # the conversation up to turn a
        assert tok.decode(ids.tolist()) == rendered
        assert f"<think>{msgs[a]['reasoning_content']}</think>" in rendered  # its own reasoning kept
        assert mask.tolist() == assistant_mask(tok, ids, think_in_prompt=False, last_only=True)
    # a tool loop after the last user turn keeps every turn's reasoning: one sample, both turns in the loss
    loop = CONVERSATION[3:6] + [{"role": "assistant", "content": "12", "reasoning_content": "done"}]
    [(ids, mask)] = Encoder(tok, None).messages({"messages": loop})
    assert tok.decode(ids.tolist()) == tok.apply_chat_template(loop, tokenize=False)
    assert mask.tolist() == assistant_mask(tok, ids, think_in_prompt=False)
    assert tok.decode(ids[mask].tolist()) == "<think>use calc</think></s><think>done</think>12</s>"


def test_synthetic_examples_as_messages_mask_like_encode_example():
    tok, enc = build_tokenizer(), Encoder(build_tokenizer(), None)
    for ex in synthetic.generate(200, seed=3):
        msgs = [{"role": "user", "content": ex["prompt"]},
                {"role": "assistant", "content": f"<think>{ex['think']}</think>{ex['answer']}"}]
        [(ids, mask)] = enc.messages({"messages": msgs})
        ref_ids, ref_mask = encode_example(tok, ex)
        assert ids.tolist() == ref_ids and mask.astype(int).tolist() == ref_mask


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": f"a{i}", "reasoning_content": "r" * (i % 7)},
                         {"role": "user", "content": "more"}, {"role": "assistant", "content": "b" * (1 + i % 5)}]}


def expected(tok, rec: dict, think_in_prompt: bool = True) -> tuple[list[int], list[bool]]:
    """A record's sample, recomputed without the store's encoder."""
    if "input_ids" in rec:
        return rec["input_ids"], [bool(m) for m in rec.get("loss_mask") or [1] * len(rec["input_ids"])]
    if "text" in rec:
        ids = tok.encode(rec["text"] + "</s>", add_special_tokens=False)
        return ids, [True] * len(ids)
    ids = tok.encode(tok.apply_chat_template(rec["messages"], tokenize=False), add_special_tokens=False)
    return ids, assistant_mask(tok, np.array(ids), think_in_prompt)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return path


def test_store_round_trip_sources_shards_counts_and_weights(tmp_path, tok_dir):
    tok = build_tokenizer()
    rng = np.random.default_rng(0)
    a = [{"text": f"doc {i} " + "x" * int(rng.integers(1, 30))} if i % 2 else conversation(i) for i in range(40)]
    b = [{"input_ids": rng.integers(0, 58, int(rng.integers(1, 40))).tolist(), "loss_mask": None} for i in range(30)]
    for rec in b[::3]:
        rec["loss_mask"] = rng.integers(0, 2, len(rec["input_ids"])).tolist()
    b[5:5] = [conversation(i) for i in range(4)]  # parquet rows hold every column: None where a record has none
    c1, c2 = [conversation(i) for i in range(10)], [{"text": f"t{i}"} for i in range(12)]
    write_jsonl(tmp_path / "a.jsonl", a)
    pq.write_table(pa.table({k: [r.get(k) for r in b] for k in ("input_ids", "loss_mask", "messages")}),
                   tmp_path / "b.parquet")
    (tmp_path / "c").mkdir()
    write_jsonl(tmp_path / "c" / "2.jsonl", c2)
    write_jsonl(tmp_path / "c" / "1.jsonl", c1)  # a folder's files are read in sorted order
    inputs = (f"{tmp_path}/a.jsonl:2", f"{tmp_path}/b.parquet:1", f"{tmp_path}/c:1")
    manifest = prepare_data(PrepareConfig(inputs=inputs, tokenizer=str(tok_dir), out=str(tmp_path / "st"),
                                          shard_tokens=200))
    store = TokenStore.open(tmp_path / "st")
    assert store.manifest == manifest
    for s, records in enumerate((a, b, c1 + c2)):
        want = [expected(tok, r) for r in records]
        got = [store.doc(s, i) for i in range(store.sources[s].n_docs)]
        assert [ids.tolist() for ids, _ in got] == [ids for ids, _ in want]
        assert [m.tolist() for _, m in got] == [m for _, m in want]
        assert store.sources[s].lengths(np.arange(len(want))).tolist() == [len(ids) for ids, _ in want]
        entry = manifest["sources"][s]
        assert (entry["records"], entry["samples"]) == (len(records), len(records))
        assert entry["tokens"] == sum(len(i) for i, _ in want) and entry["loss_tokens"] == sum(sum(m) for _, m in want)
        assert len(entry["shards"]) > 1 and entry["input"] == inputs[s]
    assert store.weights.tolist() == pytest.approx([0.5, 0.25, 0.25])
    files = store.sources[0].files
    files.limit = 4  # a store of many shards keeps only so many files (descriptors) open
    assert [store.doc(2, i)[0].tolist() for i in range(len(c1 + c2))] == [expected(tok, r)[0] for r in c1 + c2]
    assert len(files.open) == 4
    again = AutoTokenizer.from_pretrained(tok_dir)
    assert manifest["tokenizer"] == {"sha256": hashlib.sha256(again.backend_tokenizer.to_str().encode()).hexdigest(),
                                     "chat_template_sha256": hashlib.sha256(again.chat_template.encode()).hexdigest()}
    assert manifest["vocab_size"] == len(tok)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_without_weights_sources_count_by_tokens_and_dropping_templates_split(tmp_path):
    tok = dropping_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    convs = [conversation(i) for i in range(1, 7)]  # every first turn has reasoning
    write_jsonl(tmp_path / "a.jsonl", convs)
    write_jsonl(tmp_path / "b.jsonl", [{"text": "abc"}] * 4)
    manifest = prepare_data(PrepareConfig(inputs=(f"{tmp_path}/a.jsonl", f"{tmp_path}/b.jsonl"),
                                          tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "st")))
    store = TokenStore.open(tmp_path / "st")
    a = manifest["sources"][0]
    assert (a["records"], a["samples"]) == (6, 12)  # two assistant turns each, earlier reasoning dropped
    for i, conv in enumerate(convs):
        for turn, upto in enumerate((2, 4)):
            ids, mask = store.doc(0, 2 * i + turn)
            assert tok.decode(ids.tolist()) == tok.apply_chat_template(conv["messages"][:upto], tokenize=False)
            assert mask.tolist() == assistant_mask(tok, ids, think_in_prompt=False, last_only=True)
    tokens = [e["tokens"] for e in manifest["sources"]]
    assert store.weights.tolist() == pytest.approx([t / sum(tokens) for t in tokens])


def test_synthetic_store_holds_the_encoded_examples(tmp_path):
    tok = build_tokenizer()
    manifest = write_synthetic_store(tmp_path / "syn", 300, 4, tok)
    store = TokenStore.open(tmp_path / "syn")
    examples = synthetic.make_splits(300, 0, 0, seed=4)["train"]
    assert store.sources[0].n_docs == 300 == manifest["sources"][0]["samples"]
    for i, ex in enumerate(examples):
        ids, mask = encode_example(tok, ex)
        got_ids, got_mask = store.doc(0, i)
        assert got_ids.tolist() == ids and got_mask.astype(int).tolist() == mask


def test_two_workers_write_the_same_store_as_one(tmp_path, tok_dir):
    rng = np.random.default_rng(1)
    recs = [conversation(i) if i % 3 else {"text": "y" * int(rng.integers(1, 50))} for i in range(400)]
    recs[7] = "{broken"
    write_jsonl(tmp_path / "a.jsonl", recs)
    stores = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare_data(PrepareConfig(inputs=(f"{tmp_path}/a.jsonl",), tokenizer=str(tok_dir), out=str(out),
                                   workers=workers, skip_bad=True, shard_tokens=3000))
        stores.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert len(stores[0]) > 4 and stores[0] == stores[1]


def test_bad_records_name_file_and_line_and_skip_bad_counts_them(tmp_path, tok_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"text": "ok"}, "{not json",
                                       {"messages": [{"role": "user", "content": "q"}]},
                                       {"text": 5}])
    pq.write_table(pa.Table.from_pylist([{"input_ids": [1, 2]}, {"input_ids": [3, 99]}]), tmp_path / "b.parquet")
    inputs = (f"{tmp_path}/a.jsonl", f"{tmp_path}/b.parquet")
    cfg = dict(inputs=inputs, tokenizer=str(tok_dir), out=str(tmp_path / "st"))
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/a.jsonl:3: invalid JSON .*--skip-bad"):
        prepare_data(PrepareConfig(**cfg))
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.parquet"]  # nothing written, no staging folder left
    manifest = prepare_data(PrepareConfig(**cfg, skip_bad=True))
    a, b = manifest["sources"]
    assert (a["records"], a["samples"], a["skipped"]["count"]) == (5, 2, 3)
    assert [r.split(": ", 1)[0] for r in a["skipped"]["records"]] == [f"{tmp_path}/a.jsonl:{n}" for n in (3, 4, 5)]
    assert "no assistant turn" in a["skipped"]["records"][1] and "'text' must be a string" in a["skipped"]["records"][2]
    assert b["skipped"]["records"] == [f"{tmp_path}/b.parquet:2: 'input_ids' has id 99 outside the vocabulary (size 58)"]
    write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(ConfigError, match=r"t.jsonl:1: 'text' records need a tokenizer: give --tokenizer"):
        prepare_data(PrepareConfig(inputs=(f"{tmp_path}/t.jsonl",), out=str(tmp_path / "st2")))
    with pytest.raises(ConfigError, match=r"weights given for .* but not for"):
        prepare_data(PrepareConfig(inputs=(f"{tmp_path}/t.jsonl:2", f"{tmp_path}/a.jsonl"), out=str(tmp_path / "st3")))


def test_out_must_be_new_or_empty_and_open_refuses_what_is_no_store(tmp_path, tok_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"--out {tmp_path}/full: folder exists and is not empty"):
        prepare_data(PrepareConfig(inputs=(f"{tmp_path}/a.jsonl",), tokenizer=str(tok_dir), out=str(tmp_path / "full")))
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    prepare_data(PrepareConfig(inputs=(f"{tmp_path}/a.jsonl",), tokenizer=str(tok_dir), out=str(tmp_path / "empty")))
    ids = TokenStore.open(tmp_path / "empty").doc(0, 0)[0]
    assert ids.tolist() == build_tokenizer().encode("ok</s>", add_special_tokens=False)
    with pytest.raises(ConfigError, match=rf"store {tmp_path}/full: no manifest.json"):
        TokenStore.open(tmp_path / "full")
    with pytest.raises(ConfigError, match=rf"store {tmp_path}/nowhere: no such folder"):
        TokenStore.open(tmp_path / "nowhere")
    (tmp_path / "empty" / "source-000" / "shard-00000.ids.npy").unlink()
    with pytest.raises(ConfigError, match=r"store .*/empty/source-000/shard-00000.ids.npy: cannot read"):
        TokenStore.open(tmp_path / "empty")


def test_a_killed_prepare_data_leaves_nothing_that_opens(tmp_path, tok_dir):
    write_jsonl(tmp_path / "big.jsonl", [{"text": f"record {i} " + "z" * (i % 40)} for i in range(200_000)])
    out = tmp_path / "st"
    code = ("from star_elastic.data.store import PrepareConfig, prepare_data; "
            f"prepare_data(PrepareConfig(inputs=('{tmp_path}/big.jsonl',), tokenizer='{tok_dir}', out='{out}', "
            "shard_tokens=2000))")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
        while not list(tmp_path.glob(".st.*.partial/source-000/shard-00003.mask.npy")):
            assert proc.poll() is None and time.monotonic() < deadline, "prepare-data ended before any shard"
            time.sleep(0.05)
        assert proc.poll() is None  # still writing
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    folders = [out, *tmp_path.glob(".st.*")]
    assert len(folders) == 2 and not out.exists()
    for folder in folders:
        with pytest.raises(ConfigError, match=rf"store {folder}: (no manifest.json|no such folder)"):
            TokenStore.open(folder)


def test_open_data_prepares_files_and_the_synthetic_set_once_and_opens_stores(tmp_path, tok_dir):
    from star_elastic.data.loading import open_data

    notes = []
    write_jsonl(tmp_path / "a.jsonl", [{"text": "abc"}, conversation(1)])
    store = open_data(str(tmp_path / "a.jsonl"), tmp_path / "prep", str(tok_dir), log=notes.append)
    again = open_data(str(tmp_path / "a.jsonl"), tmp_path / "prep", str(tok_dir), log=notes.append)  # a resumed run
    assert len(notes) == 1 and "preparing" in notes[0] and again.fingerprint == store.fingerprint
    assert store.doc(0, 0)[0].tolist() == build_tokenizer().encode("abc</s>", add_special_tokens=False)
    assert open_data(str(tmp_path / "prep"), tmp_path / "unused").fingerprint == store.fingerprint
    tok = build_tokenizer()
    syn = open_data("synthetic", tmp_path / "syn", tokenizer=tok, n_synthetic=50, seed=2, log=notes.append)
    assert syn.doc(0, 3)[0].tolist() == encode_example(tok, synthetic.make_splits(50, 0, 0, seed=2)["train"][3])[0]
    with pytest.raises(ConfigError, match=r"syn: holds a store of other data .*, not 'synthetic'"):
        open_data("synthetic", tmp_path / "syn", tokenizer=tok, n_synthetic=60, seed=2)
