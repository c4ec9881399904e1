"""Meta-device loading: a parent with no storage, sharded by the engine, then filled from its
safetensors files one tensor at a time (issue 11, "Memory").

    teacher = prepare_teacher(meta_model(path), mode, dtype, fill=partial(fill_from_checkpoint, path=path))
    ...importance on the sharded teacher → scores...
    parallelize(step_over(meta_model(path)), teacher, ..., fill=partial(fill_from_checkpoint, path=path,
                                                                         rule=sort_rules(cfg, scores)))

The engine shards the meta model (FSDP2 `fully_shard` needs no storage), materialises it with
`to_empty` and calls the fill. For every tensor the fill reads the full parent tensor with
`safe_open` (an expert layer's stacked (E, ...) tensor is read expert by expert into one buffer),
keeps the rows of this rank's FSDP2 shard (Shard(0)) in the importance order (`sort_rules`: the
same `IndexSets.rule` / `gather` that `sort_model` and slicing use) and copies them in. A rank so
holds at most one full parent tensor beyond its shards, and the result equals loading the whole
parent, sorting it and sharding it. Files are opened per tensor and closed again, so no mapping of a
multi-GB shard file stays resident.
"""

from __future__ import annotations

import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from tqdm.auto import tqdm

from star_elastic.config import ConfigError, ModelConfig
from star_elastic.elastic.arch import gather
from star_elastic.hf import (
    _EXPERT,
    CheckpointError,
    _load_tokenizer,
    _normalise_key,
    check_transformers_version,
    checkpoint_keys,
    expected_disk_shapes,
)
from star_elastic.model.hybrid import HybridLM
from star_elastic.quant.fake import plain_state
from star_elastic.quant.load import read_quant_config

Entry = tuple[str, str, tuple[int, ...]]  # (key as stored, file name, shape)


def meta_model(path: str | Path) -> HybridLM:
    """The parent of checkpoint folder `path` on the meta device (no storage), with its tokenizer.
    A "tied" head that differs from the embeddings loads untied, as `load_model` (and transformers) do."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    check_transformers_version()
    if read_quant_config(path) is not None:
        raise ConfigError(f"{path}: a quantized parent is dequantized whole on load; pass --load full")
    cfg = _untie_if_different(path, ModelConfig.from_json(path / "config.json"))
    with torch.device("meta"):
        model = HybridLM(cfg)
    model.tokenizer = _load_tokenizer(path)
    return model.eval()


def _untie_if_different(path: Path, cfg: ModelConfig) -> ModelConfig:
    if not cfg.tie_word_embeddings:
        return cfg
    entries = disk_entries(path, cfg.replace(tie_word_embeddings=False), allow_missing_head=True)
    if "lm_head.weight" not in entries:
        return cfg
    if torch.equal(read_full(path, entries["lm_head.weight"]), read_full(path, entries["backbone.embeddings.weight"])):
        return cfg
    warnings.warn(f"{path}: tie_word_embeddings is true but lm_head.weight differs from the embeddings; "
                  "loading the stored head untied, as transformers does", stacklevel=3)
    return cfg.replace(tie_word_embeddings=False)


def disk_entries(path: Path, cfg: ModelConfig, allow_missing_head: bool = False) -> dict[str, list[Entry]]:
    """Model state key → its on-disk tensors (one per expert, in expert order, for stacked experts).
    An unknown or missing tensor raises CheckpointError naming the file and key (headers only are read)."""
    expected = expected_disk_shapes(cfg)
    stored = checkpoint_keys(path)
    entries: dict[str, list[tuple[int, Entry]]] = defaultdict(list)
    for key, fname in stored.items():
        name = _normalise_key(key)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the tied head is the embeddings (`meta_model` checked that they are equal)
        if name not in expected:
            raise CheckpointError(f"{path / fname}: unexpected tensor {name!r} for this config (pattern {cfg.pattern})")
        shape, model_key = expected[name]
        match = _EXPERT.match(name)
        entries[model_key].append((int(match.group(2)) if match else 0, (key, fname, shape)))
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings or allow_missing_head else set()
    missing = sorted(k for k in expected if k not in {_normalise_key(s) for s in stored} and k not in optional)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    return {k: [entry for _, entry in sorted(v)] for k, v in entries.items()}


def _read(path: Path, entry: Entry) -> torch.Tensor:
    key, fname, shape = entry
    try:
        with safe_open(str(path / fname), framework="pt") as f:
            t = f.get_tensor(key)
    except SafetensorError as err:
        raise CheckpointError(f"{path / fname}: unreadable safetensors file, truncated or corrupt ({err})") from None
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{path / fname}: tensor {_normalise_key(key)!r} has shape {tuple(t.shape)}, "
                              f"expected {shape}")
    return t


def read_full(path: Path, entries: list[Entry]) -> torch.Tensor:
    """One model tensor; stacked experts (E, ...) are copied into one buffer as they are read."""
    if len(entries) == 1 and _EXPERT.match(_normalise_key(entries[0][0])) is None:
        return _read(path, entries[0])
    out = None
    for e, entry in enumerate(entries):
        part = _read(path, entry)
        out = part.new_empty((len(entries), *part.shape)) if out is None else out
        out[e].copy_(part)
    return out


def local_rows(t: torch.Tensor) -> torch.Tensor | None:
    """Dim-0 positions of the global tensor that this rank's shard of `t` holds (FSDP2: Shard(0));
    None for a plain tensor (held whole)."""
    if not isinstance(t, DTensor):
        return None
    if tuple(t.placements) != (Shard(0),):
        raise ValueError(f"meta-device loading fills FSDP2 Shard(0) parameters, got placements {t.placements}")
    rows = distribute_tensor(torch.arange(t.shape[0]), t.device_mesh, t.placements, src_data_rank=None)
    return rows.to_local().cpu()


def rows_rule(rule: dict[int, torch.Tensor], rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """`rule` for only the dim-0 positions `rows` of its result: gather(t, rows_rule(r, rows)) ==
    gather(t, r)[rows]. A per-expert (2-D) index keeps the rows of the experts that stay."""
    out = {dim: idx[rows] if idx.dim() == 2 else idx for dim, idx in rule.items()}
    out[0] = rule[0][rows] if 0 in rule else rows
    return out


@torch.no_grad()
def fill_from_checkpoint(model: HybridLM, path: str | Path, rule=None) -> None:
    """Write checkpoint `path`'s weights into the materialised (possibly sharded) `model`, tensor by
    tensor; `rule(key)` (e.g. `sort_rules(cfg, scores)`) permutes each one as it streams. A
    fake-quantized `model` (quant/fake.py) gets its master weights (`plain_state`'s names)."""
    path = Path(path)
    entries = disk_entries(path, model.config)
    if model.config.tie_word_embeddings:  # `to_empty` gave the head and the embeddings separate tensors
        model.lm_head.weight = model.backbone.embeddings.weight
    targets = plain_state(dict(model.named_parameters()) | dict(model.named_buffers()))  # fake-quantized too
    quiet = dist.is_initialized() and dist.get_rank() != 0
    for key, target in tqdm(targets.items(), desc="load shards", file=sys.stderr, disable=quiet, leave=False):
        full = read_full(path, entries[key])
        r = rule(key) if rule is not None else {}
        rows = local_rows(target)
        part = gather(full, r if rows is None else rows_rule(r, rows))
        del full  # one full tensor at a time
        (target.to_local() if isinstance(target, DTensor) else target).copy_(part)
