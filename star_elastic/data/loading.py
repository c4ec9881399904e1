"""Training data → a token store, and a step's packed rows → micro-batches.

`open_data` is the recipes' one data path (data/store.py, packing.py, sampler.py): DATA is a store
folder written by `star-elastic prepare-data`, a .jsonl / .parquet file (prepared into a store once,
with a note on stderr), or "synthetic" (the built-in set, written into a store by the same writer).
`open_data_on_ranks` is the same under torchrun: rank 0 prepares while the others wait.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

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
        if tokenizer is None:
            raise ConfigError(f"data {data!r}: the built-in set needs the model's tokenizer (tokenizer.json next to "
                              "its weights)")
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
