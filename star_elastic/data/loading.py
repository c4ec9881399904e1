"""Training data → a token store, and a step's packed rows → micro-batches.

`open_data` is the recipes' one data path (data/store.py, packing.py, sampler.py): DATA is a store
folder written by `star-elastic prepare-data`, a .jsonl / .parquet file (prepared into a store once,
with a note on stderr), or "synthetic" (the built-in set, written into a store by the same writer).
`open_data_on_ranks` is the same under torchrun: rank 0 prepares while the others wait.
The list-based functions below are the path it replaces (kept for quantize until it moves).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from pathlib import Path

import torch

from star_elastic.config import ConfigError

BUILTIN = "synthetic"


def open_data(data: str, prepared: str | os.PathLike, model_dir: str | None = None, tokenizer=None,
              n_synthetic: int = 20000, seed: int = 0, log=None, vocab_size: int | None = None):
    """DATA as a TokenStore, the recipes' one data path. A store folder (prepare-data's) opens as it
    is; the built-in synthetic set (with `tokenizer`) or a .jsonl / .parquet file (with the
    tokenizer of `model_dir` where it has one; input_ids are checked against `vocab_size`) is first
    written to the folder `prepared`, with a note on stderr, or reused when `prepared` already holds
    that data (a resumed run)."""
    from star_elastic.data.store import MANIFEST, PrepareConfig, TokenStore, prepare_data, write_synthetic_store

    if Path(data).is_dir():
        return TokenStore.open(data)
    prepared, made_from = Path(prepared), {"n": n_synthetic, "seed": seed} if data == BUILTIN else None
    if (prepared / MANIFEST).is_file():
        store = TokenStore.open(prepared)
        held = store.manifest.get("synthetic") if data == BUILTIN else store.manifest["sources"][0]["input"]
        if held != (made_from if data == BUILTIN else data):
            raise ConfigError(f"{prepared}: holds a store of other data ({held}), not {data!r}; remove it or "
                              "name another folder")
        return store
    if data != BUILTIN and not Path(data).is_file():
        raise ConfigError(f"data {data!r}: no such file or folder (a store folder written by star-elastic "
                          f"prepare-data, a .jsonl or .parquet file, or {BUILTIN!r})")
    (log or (lambda msg: print(msg, file=sys.stderr)))(
        f"note: preparing {data} into a token store at {prepared} (star-elastic prepare-data does it once, "
        "in parallel, for every run)")
    if data == BUILTIN:
        _needs_tokenizer(tokenizer, "the built-in synthetic", f"data {data!r}")
        write_synthetic_store(prepared, n_synthetic, seed, tokenizer)
    else:
        has_tokenizer = model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file()
        prepare_data(PrepareConfig(inputs=(data,), tokenizer=model_dir if has_tokenizer else None,
                                   vocab_size=vocab_size, out=str(prepared)))
    return TokenStore.open(prepared)


def open_data_on_ranks(data: str, prepared: str | os.PathLike, rank: int, **kwargs):
    """`open_data` in every process of a job: rank 0 opens (preparing it if need be) while the
    others wait, then they open what it prepared. An error on rank 0 is raised on every rank."""
    from star_elastic.distributed import broadcast_json

    store, failure = None, None
    if rank == 0:
        try:
            store = open_data(data, prepared, **kwargs)
        except Exception as err:  # every rank must hear of it before rank 0 raises
            failure = err
    error = broadcast_json({"error": None if failure is None else str(failure)})["error"]  # also the barrier
    if failure is not None:
        raise failure
    if error is not None:
        raise ConfigError(error)
    return store if rank == 0 else open_data(data, prepared, **kwargs)


def check_store(store, tokenizer, vocab_size: int, model: str, log) -> None:
    """A store fits a model whose vocabulary holds every id it may contain; one prepared with another
    tokenizer than the model's gets a warning (the ids are then used as they are)."""
    from star_elastic.data.store import tokenizer_hashes

    held = store.manifest.get("vocab_size")
    if held is not None and held > vocab_size:
        raise ConfigError(f"store {store.path}: prepared for a vocabulary of {held} ids, {model} has {vocab_size}; "
                          "prepare the data with this model's tokenizer (prepare-data --tokenizer MODEL)")
    saved = (store.manifest.get("tokenizer") or {}).get("sha256")
    if saved is not None and tokenizer is not None and saved != tokenizer_hashes(tokenizer)["sha256"]:
        log(f"warning: store {store.path} was prepared with another tokenizer than {model}'s (tokenizer.json "
            f"sha256 {saved[:12]}, the model's {tokenizer_hashes(tokenizer)['sha256'][:12]})")


def _records_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{n}: invalid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object per line")
            records.append(rec)
    return records


def _records_parquet(path: Path) -> list[dict]:
    from datasets import Dataset

    try:
        return list(Dataset.from_parquet(str(path)))
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise ConfigError(f"{path}: cannot read parquet ({err})") from None


def _needs_tokenizer(tokenizer, kind: str, where: str) -> None:
    if tokenizer is None:
        raise ConfigError(f"{where}: {kind} records need a tokenizer (tokenizer.json next to the model weights); "
                          "pre-tokenized 'input_ids' records do not")


def _encode_record(rec: dict, tokenizer, where: str, vocab_size: int) -> tuple[list[int], list[int]]:
    if "input_ids" in rec:
        ids = rec["input_ids"]
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ConfigError(f"{where}: 'input_ids' must be a list of integers")
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ConfigError(f"{where}: 'input_ids' has ids outside the vocabulary (size {vocab_size})")
        return list(ids), [1] * len(ids)
    if "messages" in rec or "text" in rec:
        _needs_tokenizer(tokenizer, "'messages' / 'text'", where)
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
            raise ConfigError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        prompt = [m for m in msgs if m["role"] != "assistant"]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(full, add_special_tokens=False)
        n_head = len(tokenizer.encode(head, add_special_tokens=False)) if full.startswith(head) else 0
        return ids, [0] * n_head + [1] * (len(ids) - n_head)
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise ConfigError(f"{where}: 'text' must be a string")
        ids = tokenizer.encode(rec["text"], add_special_tokens=False)
        return ids, [1] * len(ids)
    raise ConfigError(f"{where}: a record needs 'input_ids', 'messages' or 'text' (found keys {sorted(rec)})")


def load_sequences(data: str, tokenizer, n_synthetic: int = 20000, seed: int = 0,
                   vocab_size: int | None = None) -> list[tuple[list[int], list[int]]]:
    """DATA (a .jsonl / .parquet path, or "synthetic") → list of (ids, loss_mask).

    `tokenizer` may be None when every record is pre-tokenized `input_ids`; those are checked
    against `vocab_size` (default: the tokenizer's size).
    """
    if data == BUILTIN:
        _needs_tokenizer(tokenizer, "the built-in synthetic", f"data {data!r}")
        from star_elastic.data import synthetic
        from star_elastic.data.tokenizer import encode_example

        return [encode_example(tokenizer, ex) for ex in synthetic.make_splits(n_synthetic, 0, 0, seed=seed)["train"]]
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"data {data!r}: no such file (use a .jsonl or .parquet file, or {BUILTIN!r})")
    if path.suffix == ".jsonl":
        records = _records_jsonl(path)
    elif path.suffix == ".parquet":
        records = _records_parquet(path)
    else:
        raise ConfigError(f"{path}: unsupported data format {path.suffix!r}; use .jsonl or .parquet")
    if not records:
        raise ConfigError(f"{path}: no records")
    vocab_size = vocab_size or len(tokenizer or [])
    seqs = [_encode_record(rec, tokenizer, f"{path}:{i + 1}", vocab_size) for i, rec in enumerate(records)]
    return [s for s in seqs if len(s[0]) >= 2]


def batch_for_step(
    seqs: list[tuple[list[int], list[int]]], step: int, rank: int, batch_size: int, seq_len: int, pad_id: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of `rank` at `step`: a pure function of (seed, step, rank), so that a resumed run
    and an uninterrupted one see the same data. Returns ids (B, T) and a 0/1 loss mask (B, T)."""
    rng = random.Random(f"{seed}:{step}:{rank}")
    picked = [seqs[rng.randrange(len(seqs))] for _ in range(batch_size)]
    width = min(seq_len, max(len(ids) for ids, _ in picked))
    ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    mask = torch.zeros(batch_size, width, dtype=torch.long)
    for i, (tok, m) in enumerate(picked):
        tok, m = tok[:width], m[:width]
        ids[i, : len(tok)] = torch.tensor(tok)
        mask[i, : len(m)] = torch.tensor(m)
    return ids, mask


def check_micro_batch_size(rows: int | None, batch_size: int, world: int) -> None:
    """A micro-batch size must divide each process's share of the global batch."""
    if rows is not None and (batch_size // world) % rows:
        raise ConfigError(f"micro_batch_size {rows} must divide each process's {batch_size // world} sequences "
                          f"(batch_size {batch_size} over {world} processes)")


def split_rows(rows, size: int | None, rank: int = 0) -> list:
    """This process's rows of a step (a packing.Rows of R rows) in micro-batches of `size` rows
    (None: all R in one), each as (global index, Rows). The global batch (the processes' rows in
    rank order) is cut into global micro-batches of `size` rows: process `rank`'s j-th is number
    rank · R / size + j, whatever the number of processes. Packed rows all have the same length,
    so no sorting or trimming is needed."""
    n = rows.ids.shape[0]
    size = size or n
    if n % size:
        raise ConfigError(f"micro_batch_size {size} must divide the {n} rows of each process's batch")
    return [(rank * (n // size) + j, type(rows)(*(getattr(rows, f.name)[j * size : (j + 1) * size]
                                                for f in dataclasses.fields(rows))))
            for j in range(n // size)]


def micro_batches(rows: int | None, real: torch.Tensor, *tensors: torch.Tensor):
    """Yield (last, parts): `tensors` (each (B, T, ...), right-padded rows) cut into the micro-batches
    of `length_groups`, each part trimmed to the group's longest row by `real` (B, T), the 0/1 mask
    of the positions a loss or the model needs. One group (`rows` None or >= B): the tensors whole."""
    from star_elastic.train.parent import length_groups

    lengths = row_lengths(real) if rows is not None else [real.shape[1]] * real.shape[0]
    groups = length_groups(lengths, rows)
    if len(groups) == 1:
        yield True, tensors
        return
    for j, group in enumerate(groups):
        index, width = torch.as_tensor(group, device=real.device), max(lengths[i] for i in group)
        yield j == len(groups) - 1, tuple(t[index, :width] for t in tensors)


def row_lengths(real: torch.Tensor) -> list[int]:
    """(B, T) 0/1 real-token mask of right-padded rows → each row's length up to its last real token."""
    positions = torch.arange(1, real.shape[1] + 1, device=real.device)
    return (real.ne(0) * positions).amax(dim=1).tolist()
