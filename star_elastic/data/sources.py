"""prepare-data's inputs: `PATH[:WEIGHT]` specs → sources of files → records, streamed.

A spec names a file, a glob or a folder (every .jsonl / .parquet under it, sorted); each spec is
one source of the mixture. Files are read as streams, never whole: jsonl line by line (the raw
bytes; decoding and JSON parsing happen in the tokenizing workers), parquet in row batches of
pyarrow's `iter_batches`. Each record carries its place, `path:LINE` (the 1-based line of a jsonl
file, the 1-based row of a parquet file), for error messages.
"""

from __future__ import annotations

import dataclasses
import glob
import math
from collections.abc import Iterator
from pathlib import Path

from star_elastic.config import ConfigError

SUFFIXES = (".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class Source:
    """One input spec: its files and mixture weight (None: not given)."""

    spec: str
    files: tuple[Path, ...]
    weight: float | None


def split_weight(spec: str) -> tuple[str, float | None]:
    """"data/a.jsonl:0.7" → ("data/a.jsonl", 0.7); a spec without a numeric tail has no weight."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head:
        return spec, None
    try:
        weight = float(tail)
    except ValueError:
        return spec, None
    if not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"input {spec!r}: weight {tail!r} must be a positive number")
    return head, weight


def expand(pattern: str) -> tuple[Path, ...]:
    """A file, a glob or a folder → its .jsonl / .parquet files, sorted."""
    path = Path(pattern)
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file()]
    elif glob.has_magic(pattern):
        found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise ConfigError(f"input {pattern}: unsupported format {path.suffix!r}; use .jsonl or .parquet files")
        return (path,)
    else:
        raise ConfigError(f"input {pattern}: no such file or folder")
    files = tuple(sorted(p for p in found if p.suffix in SUFFIXES))
    if not files:
        raise ConfigError(f"input {pattern}: no .jsonl or .parquet files there")
    return files


def parse_inputs(specs: tuple[str, ...]) -> list[Source]:
    """Every spec → a Source; weights are given for all specs or for none."""
    sources = []
    for spec in specs:
        pattern, weight = split_weight(spec)
        sources.append(Source(spec, expand(pattern), weight))
    given = [s.spec for s in sources if s.weight is not None]
    if given and len(given) != len(sources):
        missing = [s.spec for s in sources if s.weight is None]
        raise ConfigError(f"inputs: weights given for {given} but not for {missing}; give every input a "
                          "weight (PATH:WEIGHT) or none (then each source counts by its tokens)")
    return sources


def records(path: Path) -> Iterator[tuple[str, bytes | dict]]:
    """(where, payload) per record of one file: raw line bytes for jsonl (blank lines skipped), a
    dict per parquet row."""
    reader = _jsonl if path.suffix == ".jsonl" else _parquet
    yield from reader(path)


def _jsonl(path: Path) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{n}", line


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise ConfigError(f"{path}: cannot read parquet ({err})") from None
    row = 0
    for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for rec in batch.to_pylist():
            row += 1
            yield f"{path}:{row}", rec
