"""The token store: prepare-data writes it once; training reads the rows it needs from it.

Layout (plain .npy files, memory-mappable with `np.load(mmap_mode="r")`):
    STORE/manifest.json                         written last; a folder without it is no store
    STORE/source-000/shard-00000.ids.npy        (tokens,) uint32   token ids, documents end to end
    STORE/source-000/shard-00000.offsets.npy    (docs + 1,) uint64 document d is ids[off[d]:off[d+1]]
    STORE/source-000/shard-00000.mask.npy       (ceil(tokens / 8),) uint8  np.packbits of the loss mask
One source per input spec (the mixture's parts); a document never crosses shards; a shard closes
once it holds `shard_tokens` tokens. The loss mask is token-aligned: bit t says token t is a loss
target (predicted from position t - 1).

Writing is atomic: the shards go into a hidden staging folder beside `--out`, which is renamed to
`--out` at the end; then the manifest is written (to a temporary name, then renamed). A killed run
leaves at most a staging folder or an `--out` without manifest, and `TokenStore.open` refuses both.
Output is identical for any number of workers: records are encoded in chunks by a process pool
and written in input order.

Reading takes positioned reads (`os.preadv`) of exactly the tokens, mask bytes and offsets asked
for, into fresh arrays: the process holds nothing of a shard but an open file, so its memory does
not grow with the store or with how much of it a run has read (a memory map keeps every page it
touched resident: its RSS grows with the data read, up to the store's size). The kernel's page
cache serves both alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import OrderedDict, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from star_elastic.config import ConfigError, check_out_dir
from star_elastic.data.encode import Encoder, encode_chunk, init_worker, worker_chunk
from star_elastic.data.sources import Source, parse_inputs, records

FORMAT, VERSION = "star-elastic-token-store", 1
MANIFEST = "manifest.json"
CHUNK_RECORDS = 64  # records per task sent to a worker
LISTED_SKIPS = 1000  # skipped records listed by place in the manifest (all are counted)

Item = tuple[int, str, "list | str"]  # (source index, "path:LINE", samples or an error message)


@dataclasses.dataclass
class PrepareConfig:
    """`star-elastic prepare-data INPUT... --tokenizer MODEL_DIR --out STORE`: tokenize once into a store."""

    inputs: tuple[str, ...] = ()
    """Input .jsonl / .parquet files, globs or folders, each optionally PATH:WEIGHT (the share of
    training tokens drawn from it, e.g. reasoning.jsonl:0.7 pretrain.parquet:0.3); without weights
    every source counts by its tokens. Records hold one of messages, text or input_ids."""
    tokenizer: str | None = None
    """Model folder with tokenizer.json (and its chat template); not needed when every record is input_ids."""
    out: str = ""
    """Store folder to write; must be new or empty."""
    workers: int = 1
    """Tokenizing processes; the store is the same for any number."""
    skip_bad: bool = False
    """Count bad records in the manifest (with file:line and why) instead of stopping at the first."""
    vocab_size: int | None = None
    """input_ids must be below this; default: config.json's vocab_size next to the tokenizer, else its size."""
    append_eos: bool = True
    """End each text record with the tokenizer's eos token."""
    shard_tokens: int = 1 << 26
    """Tokens per shard (a shard is held in memory while it is written)."""

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        if not self.inputs:
            raise ConfigError("inputs: name at least one .jsonl / .parquet file, glob or folder")
        if not self.out:
            raise ConfigError("out: name the store folder to write (--out STORE)")
        for key in ("workers", "shard_tokens", "vocab_size"):
            value = getattr(self, key)
            if value is not None and (type(value) is not int or value < 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.vocab_size is not None and self.vocab_size > 1 << 32:
            raise ConfigError(f"vocab_size {self.vocab_size}: ids are stored as uint32 (at most {1 << 32})")


# --- tokenizer ------------------------------------------------------------------------------
def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of a model folder (its tokenizer.json); errors name the folder."""
    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"--tokenizer {path}: no tokenizer.json there; name the model folder")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_hashes(tok) -> dict:
    """sha256 of the tokenizer.json content (as the tokenizers library serialises it: the same for a
    tokenizer built in memory and the one saved from it) and of the chat template."""
    digest = lambda text: None if text is None else hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    return {"sha256": digest(tok.backend_tokenizer.to_str()), "chat_template_sha256": digest(tok.chat_template)}


def resolve_vocab_size(cfg: PrepareConfig, tok) -> int | None:
    """--vocab-size, else config.json's vocab_size next to the tokenizer, else the tokenizer's size."""
    if cfg.vocab_size is not None:
        return cfg.vocab_size
    config = Path(cfg.tokenizer or "") / "config.json"
    if cfg.tokenizer and config.is_file():
        try:
            return int(json.loads(config.read_text())["vocab_size"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{config}: no integer vocab_size ({err}); give --vocab-size") from None
    return None if tok is None else len(tok)


# --- writing --------------------------------------------------------------------------------
class _SourceWriter:
    """One source's shards and counts; a shard's tokens are buffered until it is written."""

    def __init__(self, folder: Path, shard_tokens: int):
        self.folder, self.shard_tokens = folder, shard_tokens
        folder.mkdir()
        self.ids: list[np.ndarray] = []  # per sample (n,) uint32
        self.masks: list[np.ndarray] = []  # per sample (n,) bool
        self.buffered = 0  # tokens in self.ids
        self.shards: list[dict] = []
        self.counts = {"records": 0, "samples": 0, "tokens": 0, "loss_tokens": 0}
        self.skipped: list[str] = []
        self.n_skipped = 0

    def add(self, samples: list) -> None:
        self.counts["records"] += 1
        for ids, mask in samples:
            self.ids.append(ids)
            self.masks.append(mask)
            self.buffered += len(ids)
            self.counts["samples"] += 1
            self.counts["tokens"] += len(ids)
            self.counts["loss_tokens"] += int(mask.sum())
        if self.buffered >= self.shard_tokens:
            self.flush()

    def skip(self, where: str, message: str) -> None:
        self.counts["records"] += 1
        self.n_skipped += 1
        if len(self.skipped) < LISTED_SKIPS:
            self.skipped.append(f"{where}: {message}")

    def flush(self) -> None:
        if not self.ids:
            return
        name = f"shard-{len(self.shards):05d}"
        offsets = np.zeros(len(self.ids) + 1, dtype=np.uint64)  # (docs + 1,)
        np.cumsum([len(a) for a in self.ids], out=offsets[1:])
        np.save(self.folder / f"{name}.ids.npy", np.concatenate(self.ids).astype(np.uint32, copy=False))
        np.save(self.folder / f"{name}.offsets.npy", offsets)
        np.save(self.folder / f"{name}.mask.npy", np.packbits(np.concatenate(self.masks)))
        self.shards.append({"name": name, "docs": len(self.ids), "tokens": int(offsets[-1])})
        self.ids, self.masks, self.buffered = [], [], 0

    def close(self, input_spec: str, files: list[str]) -> dict:
        self.flush()
        if not self.counts["samples"]:
            raise ConfigError(f"input {input_spec}: no samples ({self.counts['records']} records, "
                              f"{self.n_skipped} skipped{': ' + self.skipped[0] if self.skipped else ''})")
        return {"name": self.folder.name, "input": input_spec, "files": files, **self.counts,
                "skipped": {"count": self.n_skipped, "records": self.skipped}, "shards": self.shards}


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out` (same file system, so the final rename is atomic); removed on error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _publish(stage: Path, out: Path, manifest: dict) -> None:
    """Rename the staging folder to `out` (replacing it if empty), then write the manifest last."""
    os.rename(stage, out)
    tmp = out / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)


def _normalised(weights: list[float | None], tokens: list[int]) -> list[float]:
    raw = tokens if weights[0] is None else weights
    return [float(w) / sum(raw) for w in raw]


def write_store(out: str | os.PathLike, items: Iterator[Item], sources: list[tuple[str, list[str], float | None]],
                tok, settings: dict, skip_bad: bool = False, shard_tokens: int = 1 << 26) -> dict:
    """Write encoded `items` (in order) as a store at `out`; `sources` are (input spec, files, weight).
    Returns the manifest. The one writer of prepare-data and the built-in synthetic set."""
    out = check_out_dir(out, "--out", empty=True)
    with _staging(out) as stage:
        writers = [_SourceWriter(stage / f"source-{i:03d}", shard_tokens) for i in range(len(sources))]
        for source, where, result in _progress(items):
            if isinstance(result, list):
                writers[source].add(result)
            elif skip_bad:
                writers[source].skip(where, result)
            else:
                raise ConfigError(f"{where}: {result} (--skip-bad counts such records in the manifest instead)")
        entries = [w.close(spec, files) for w, (spec, files, _) in zip(writers, sources)]
        weights = _normalised([w for *_, w in sources], [e["tokens"] for e in entries])
        manifest = {"format": FORMAT, "version": VERSION,
                    "tokenizer": tokenizer_hashes(tok) if tok is not None else None, **settings,
                    "sources": [{**e, "weight": w} for e, w in zip(entries, weights)]}
        _publish(stage, out, manifest)
    return manifest


def _progress(items: Iterator[Item]) -> Iterator[Item]:
    """The items, counted on a tqdm bar on stderr (records, and tokens as its postfix)."""
    from tqdm import tqdm

    tokens = 0
    with tqdm(unit=" records", file=sys.stderr, disable=None, mininterval=1.0) as bar:
        for item in items:
            yield item
            if isinstance(item[2], list):
                tokens += sum(len(ids) for ids, _ in item[2])
            bar.update(1)
            if bar.n % 1000 == 0:
                bar.set_postfix(tokens=tokens, refresh=False)


# --- prepare-data ---------------------------------------------------------------------------
def prepare_data(cfg: PrepareConfig) -> dict:
    """Tokenize cfg.inputs into a store at cfg.out; returns the manifest."""
    check_out_dir(cfg.out, "--out", empty=True)  # before any reading: refuse early
    sources = parse_inputs(cfg.inputs)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    encoder = Encoder(tok, resolve_vocab_size(cfg, tok), cfg.append_eos)
    settings = {"vocab_size": encoder.vocab_size, "append_eos": cfg.append_eos}
    return write_store(cfg.out, _encoded(sources, encoder, cfg.workers),
                       [(s.spec, [str(f) for f in s.files], s.weight) for s in sources],
                       tok, settings, cfg.skip_bad, cfg.shard_tokens)


def _chunks(sources: list[Source]) -> Iterator[list]:
    """Every record of every source's files, in order, in chunks of (source, where, payload)."""
    chunk = []
    for i, source in enumerate(sources):
        for path in source.files:
            for where, payload in records(path):
                chunk.append((i, where, payload))
                if len(chunk) == CHUNK_RECORDS:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def _encoded(sources: list[Source], encoder: Encoder, workers: int) -> Iterator[Item]:
    """Encoded records in input order; with workers > 1 a pool encodes a bounded number of chunks
    ahead (Pool.imap would read the whole input ahead)."""
    if workers == 1:
        for chunk in _chunks(sources):
            yield from encode_chunk(encoder, chunk)
        return
    import multiprocessing

    # forkserver: one fresh process imports the libraries once and forks the workers from it (no
    # threads of this process are inherited, as with fork; no import per worker, as with spawn)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["star_elastic.data.encode", "transformers"])
    with ctx.Pool(workers, init_worker, (encoder,)) as pool:
        pending = deque()
        for chunk in _chunks(sources):
            pending.append(pool.apply_async(worker_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def write_synthetic_store(out: str | os.PathLike, n: int, seed: int, tokenizer) -> dict:
    """The built-in synthetic reasoning set (`synthetic.make_splits(n, 0, 0, seed)`'s train split,
    encoded by `encode_example`) as a one-source store: the recipes' one data path."""
    from star_elastic.data import synthetic
    from star_elastic.data.tokenizer import encode_example

    def items():
        for i, ex in enumerate(synthetic.make_splits(n, 0, 0, seed=seed)["train"]):
            ids, mask = encode_example(tokenizer, ex)
            yield 0, f"synthetic:{i + 1}", [(np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=bool))]

    settings = {"vocab_size": len(tokenizer), "append_eos": False, "synthetic": {"n": n, "seed": seed}}
    return write_store(out, items(), [("synthetic", [], None)], tokenizer, settings)


# --- reading --------------------------------------------------------------------------------
ARRAYS = {  # kind → (dtype, shape from the manifest's shard entry)
    "ids": (np.uint32, lambda shard: (shard["tokens"],)),
    "offsets": (np.uint64, lambda shard: (shard["docs"] + 1,)),
    "mask": (np.uint8, lambda shard: ((shard["tokens"] + 7) // 8,)),
}
MAX_OPEN_FILES = 192  # a large store has thousands of shard files


class _Files:
    """Shard files opened on first use (their .npy header checked), the least recently used closed
    beyond `limit`; each as (file descriptor, byte offset of its data)."""

    def __init__(self, limit: int = MAX_OPEN_FILES):
        self.limit, self.open = limit, OrderedDict()

    def get(self, file: Path, dtype, shape: tuple[int]) -> tuple[int, int]:
        entry = self.open.pop(file, None)
        self.open[file] = _opened(file, dtype, shape) if entry is None else entry
        if len(self.open) > self.limit:
            os.close(self.open.popitem(last=False)[1][0])
        return self.open[file]


@dataclasses.dataclass
class StoreSource:
    """One source's shards, memory-mapped on use. Document i of the source lives in shard
    `searchsorted(doc_starts, i, "right") - 1`."""

    name: str
    weight: float
    folder: Path
    shards: list[dict]  # the manifest's entries: name, docs, tokens
    doc_starts: np.ndarray  # (shards + 1,) int64: first document of each shard
    files: _Files

    @property
    def n_docs(self) -> int:
        return int(self.doc_starts[-1])

    def read(self, shard: int, kind: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of shard `shard`'s "ids" (tokens,) uint32, "offsets" (docs + 1,)
        uint64 or "mask" (ceil(tokens / 8),) uint8 (packed bits), read into a new array."""
        dtype, shape = ARRAYS[kind]
        entry = self.shards[shard]
        file = self.folder / f"{entry['name']}.{kind}.npy"
        fd, offset = self.files.get(file, dtype, shape(entry))
        size = np.dtype(dtype).itemsize
        out = np.empty(stop - start, dtype=dtype)
        if os.preadv(fd, [out.view(np.uint8)], offset + start * size) != out.nbytes:
            raise ConfigError(f"store {file}: shorter than its header says; prepare the store again")
        return out

    def _locate(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.doc_starts, docs, side="right") - 1
        return shard, docs - self.doc_starts[shard]

    def lengths(self, docs) -> np.ndarray:
        """Token counts of documents `docs` (any int array), int64; reads only their offsets."""
        docs = np.asarray(docs, dtype=np.int64)
        shard, local = self._locate(docs.reshape(-1))
        out = [np.diff(self.read(s, "offsets", d, d + 2).astype(np.int64))[0]
               for s, d in zip(shard.tolist(), local.tolist())]
        return np.array(out, dtype=np.int64).reshape(docs.shape)

    def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) of document `doc`: ids (n,) uint32 and loss mask (n,) bool (copies)."""
        if not 0 <= doc < self.n_docs:
            raise IndexError(f"source {self.name}: document {doc} out of range ({self.n_docs} documents)")
        shard, local = (int(x) for x in self._locate(np.int64(doc)))
        first, end = (int(x) for x in self.read(shard, "offsets", local, local + 2))
        lo, hi = first + start, first + (end - first if stop is None else stop)
        bits = np.unpackbits(self.read(shard, "mask", lo // 8, (hi + 7) // 8))
        return self.read(shard, "ids", lo, hi), bits[lo % 8 : lo % 8 + hi - lo].astype(bool)


class TokenStore:
    """A prepared store, memory-mapped: `sources[i]` per source, `manifest`, `doc(source, i)`."""

    def __init__(self, path: Path, manifest: dict, sources: list[StoreSource], fingerprint: str):
        self.path, self.manifest, self.sources, self.fingerprint = path, manifest, sources, fingerprint

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenStore:
        """Check the manifest and every shard file's dtype and shape; read them on use."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"store {path}: no such folder (write one with star-elastic prepare-data)")
        raw = _read_manifest(path)
        manifest, files = json.loads(raw), _Files()
        sources = [_open_source(path, entry, files) for entry in manifest["sources"]]
        return cls(path, manifest, sources, hashlib.sha256(raw).hexdigest()[:16])

    def source(self, source: int | str) -> StoreSource:
        if isinstance(source, str):
            names = [s.name for s in self.sources]
            if source not in names:
                raise ConfigError(f"store {self.path}: no source {source!r} (it has {names})")
            return self.sources[names.index(source)]
        return self.sources[source]

    def doc(self, source: int | str, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Document i of a source: ids (n,) uint32 and loss mask (n,) bool."""
        return self.source(source).tokens(i)

    @property
    def weights(self) -> np.ndarray:
        """(sources,) float64, the mixture's token shares (sum 1)."""
        return np.array([s.weight for s in self.sources])


def _read_manifest(path: Path) -> bytes:
    file = path / MANIFEST
    if not file.is_file():
        raise ConfigError(f"store {path}: no {MANIFEST} (a prepare-data that did not finish leaves none); "
                          "prepare the store again into a new folder")
    raw = file.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"store {file}: not JSON ({err.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"store {file}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ConfigError(f"store {file}: version {manifest.get('version')!r}; this star-elastic reads version {VERSION}")
    return raw


def _open_source(path: Path, entry: dict, files: _Files) -> StoreSource:
    starts = np.zeros(len(entry["shards"]) + 1, dtype=np.int64)
    np.cumsum([s["docs"] for s in entry["shards"]], out=starts[1:])
    source = StoreSource(entry["name"], float(entry["weight"]), path / entry["name"], entry["shards"], starts, files)
    for i, shard in enumerate(entry["shards"]):
        for kind in ARRAYS:
            source.read(i, kind, 0, 0)  # dtype and shape checked against the manifest
        end = int(source.read(i, "offsets", shard["docs"], shard["docs"] + 1)[0])
        if end != shard["tokens"]:
            raise ConfigError(f"store {source.folder / shard['name']}.offsets.npy: ends at {end}, the manifest says "
                              f"{shard['tokens']} tokens; prepare the store again")
    return source


def _opened(file: Path, dtype, shape: tuple[int]) -> tuple[int, int]:
    """(file descriptor, data offset) of a .npy file whose header says `dtype` and `shape`."""
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            saved_shape, fortran, saved_dtype = header(f)
            offset = f.tell()
        size = file.stat().st_size
    except (OSError, ValueError) as err:
        raise ConfigError(f"store {file}: cannot read ({err}); prepare the store again") from None
    if saved_dtype != dtype or saved_shape != shape or fortran:
        raise ConfigError(f"store {file}: {saved_dtype} {saved_shape}, the manifest says {np.dtype(dtype)} {shape}; "
                          "prepare the store again")
    if size < offset + int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise ConfigError(f"store {file}: shorter than its header says; prepare the store again")
    return os.open(file, os.O_RDONLY), offset
