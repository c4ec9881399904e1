"""Zero-shot slicing: an Architecture and the full (sorted) weights → a standalone smaller checkpoint.

Every tensor of the result is a leading slice of the full model's (per group for grouped heads),
gathered with the same index sets the elastic forward uses for its masks
(`star_elastic.elastic.arch.IndexSets`; `arch.slice_model` is the in-memory counterpart).

`slice_checkpoint` cuts explicit architectures out of any sorted `nemotron_h` checkpoint directory
(BF16 / FP32, or FP8 / NVFP4 in the ModelOpt layout) with no run folder, streaming: one input
tensor and one output shard in memory at a time. `slice_run` does the same for the architecture
an elastic run's router picks for a budget.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from star_elastic.config import ConfigError, ModelConfig, QuantConfig, check_out_dir
from star_elastic.elastic.arch import Architecture, load_arch_file, parse_arch
from star_elastic.elastic.run import load_router
from star_elastic.hf import (CheckpointError, ShardWriter, _normalise_key, checkpoint_keys, expected_disk_shapes,
                             iter_tensors, write_config)
from star_elastic.quant.export import TensorSlicer, quant_metadata, write_quant_configs
from star_elastic.quant.load import EXPERT_MODULE, quant_format, read_quant_config

DEFAULT_SHARD_BYTES = 2 << 30
# files copied unchanged into every slice (tokenizer, chat template, generation defaults)
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
           "generation_config.json", "added_tokens.json")


@dataclasses.dataclass
class SliceConfig:
    """`star-elastic slice`: one way to name what to cut (a budget, an architecture or a file of them)."""

    run: str = ""
    """An elastic run folder (with --budget), or any sorted nemotron_h checkpoint folder (BF16, FP8 or
    NVFP4; with --arch / --arch-file). Every variant must be a prefix: NVIDIA's Elastic checkpoints and
    our runs are sorted by importance."""
    out: str = ""
    """Output folder (must be new or empty)."""
    budget: float | None = None
    """A trained budget of the run's router (e.g. 0.5)."""
    arch: str | None = None
    """Per-axis sizes, e.g. hidden=2048,mamba_heads=6,experts=96,layers=0-23+26; axes: hidden, attn_heads
    (per KV group), mamba_heads (per SSM group), experts, expert_inter, shared_inter, mlp_inter, layers;
    axes not named stay full."""
    arch_file: str | None = None
    """JSON {"23b": {"hidden": 2048, ...}, "12b": "hidden=1536,..."}: one folder per name under --out."""
    max_shard_gb: float = 2.0
    """Largest output shard (GB)."""
    json: bool = False
    """Print the result as one JSON object on standard output."""

    def __post_init__(self) -> None:
        given = [f"--{k.replace('_', '-')}" for k in ("budget", "arch", "arch_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"slice needs exactly one of --budget, --arch, --arch-file (got {given or 'none'})")
        if not self.run or not self.out:
            raise ConfigError("slice needs RUN_OR_CKPT and --out")
        if self.max_shard_gb <= 0:
            raise ConfigError(f"--max-shard-gb {self.max_shard_gb}: must be positive")


def slice_command(cfg: SliceConfig) -> dict:
    """`star-elastic slice`: the result dict (per variant with --arch-file), progress on stderr."""
    max_bytes = int(cfg.max_shard_gb * 2**30)
    if cfg.budget is not None:
        check_out_dir(cfg.out, empty=True)
        return slice_run(cfg.run, cfg.budget, cfg.out, max_bytes)
    ckpt = checkpoint_dir(cfg.run)
    return slice_checkpoint(ckpt, read_archs(ckpt, cfg.arch, cfg.arch_file), cfg.out, max_bytes)


def checkpoint_dir(path) -> Path:
    """A checkpoint folder, or an elastic run folder (its shared weights in RUN/model)."""
    path = Path(path)
    if (path / "run.json").is_file():
        return path / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a checkpoint folder (no config.json) nor an elastic run (no run.json)")
    return path


def read_archs(ckpt: Path, arch: str | None, arch_file: str | None) -> dict[str, Architecture] | Architecture:
    """--arch TEXT (one Architecture) or --arch-file JSON (name → Architecture) against the checkpoint's config."""
    cfg = ModelConfig.from_json(ckpt / "config.json")
    return parse_arch(arch, cfg) if arch is not None else load_arch_file(arch_file, cfg)


def slice_checkpoint(src, archs: dict[str, Architecture] | Architecture, out,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Cut explicit architectures out of a sorted checkpoint directory, streaming.

    `archs`: one Architecture (written to `out`) or name → Architecture (written to `out/name`).
    The checkpoint must already be sorted by importance: every kept component is a prefix.
    Everything is written into a staging folder next to `out` and moved in place at the end, so a
    failure leaves nothing behind.
    """
    src, out = checkpoint_dir(src), check_out_dir(out, empty=True)
    cfg = ModelConfig.from_json(src / "config.json")
    named = {None: archs} if isinstance(archs, Architecture) else dict(archs)
    for arch in named.values():
        arch.validate(cfg)
    quant = read_quant_config(src)
    keys = {key: _normalise_key(key) for key in checkpoint_keys(src)}  # as stored → backbone.* names
    stage = out.with_name(f".{out.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        result = {name: _write_slice(src, cfg, arch, keys, quant, stage / name if name else stage, max_shard_bytes,
                                     name or out.name)
                  for name, arch in named.items()}
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result[None] if None in result else result


def slice_run(run, budget: float, out, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """`star-elastic slice RUN --budget B`: the router's architecture for `budget`, cut from RUN/model
    by `slice_checkpoint` (streamed and sharded as for `--arch`; a quantized run from its packed
    tensors, never dequantized). Only the router is loaded to pick the architecture.

    Returns the submodel's `ElasticLM.describe` (sizes, parameter counts, target vs achieved cost)
    with `slice_checkpoint`'s report (bytes written, quantization)."""
    elastic = load_router(run)
    arch = elastic.architecture(budget)
    return elastic.describe(budget) | slice_checkpoint(Path(run) / "model", arch, out, max_shard_bytes)


def _write_slice(src: Path, cfg: ModelConfig, arch: Architecture, keys: dict[str, str], quant: dict | None,
                 dest: Path, max_shard_bytes: int, label: str) -> dict:
    fmt = None if quant is None else quant_format(quant)
    small = arch.model_config(cfg)
    dest.mkdir(parents=True)
    writer = ShardWriter(dest, max_shard_bytes)
    dtype = _stream(src, cfg, keys, TensorSlicer(cfg, arch, keys.values(), fmt), writer, label)
    if quant is None:
        write_config(small, dest, dtype)
    else:
        _write_quant_meta(dest, small, quant, fmt, writer.written_keys)
    for name in _COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    return {"architecture": arch.to_dict(), "bytes": writer.total_bytes, "peak_tensor_bytes": writer.peak_bytes,
            "quantization": fmt}


def _stream(src: Path, cfg: ModelConfig, keys: dict[str, str], slicer, writer, label: str) -> torch.dtype:
    """Every input tensor, one at a time, through `slicer` into `writer`; returns the embeddings' dtype.

    Unquantized tensors must have config.json's shapes (a larger tensor would slice silently wrong)."""
    expected = expected_disk_shapes(cfg)
    missing = sorted(set(expected) - set(keys.values()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if missing:
        raise CheckpointError(f"{src}: missing tensor {missing[0]!r} for this config (pattern {cfg.pattern})")
    dtype = torch.bfloat16
    for key, t, fname in tqdm(iter_tensors(src), total=len(keys), desc=f"slice {label}", unit="tensor",
                              leave=False, file=sys.stderr):
        packed = f"{key.rsplit('.', 1)[0]}.weight_scale" in slicer.keys
        if key in expected and not packed and tuple(t.shape) != expected[key][0]:
            raise CheckpointError(f"{src / fname}: tensor {key!r} has shape {tuple(t.shape)}, expected {expected[key][0]}")
        try:
            sliced = slicer(key, t)
        except KeyError:
            raise CheckpointError(f"{src / fname}: tensor {key!r} has no slicing rule (pattern {cfg.pattern})") from None
        except (IndexError, RuntimeError) as err:
            raise CheckpointError(f"{src / fname}: tensor {key!r} {tuple(t.shape)} does not fit config.json ({err})") from None
        if key == "backbone.embeddings.weight":
            dtype = t.dtype
        if sliced is not None:
            writer.add(*sliced)
        del t, sliced
    writer.close()
    return dtype


def _write_quant_meta(dest: Path, small: ModelConfig, quant: dict, fmt: str, keys: list[str]) -> None:
    """hf_quant_config.json for the sliced config: the project's exclusion builder run on it,
    with the quantized set read from the slice's own tensors (linears that carry a weight_scale)."""
    quantized = set()
    for key in keys:
        if key.endswith(".weight_scale"):
            module = key.removesuffix(".weight_scale")
            expert = EXPERT_MODULE.match(module)
            quantized.add(expert.group(1) if expert else module)
    fresh = quant_metadata(QuantConfig(format=fmt, include=tuple(sorted(quantized)) or ("-",)), small)
    meta = quant | {"quantization": quant["quantization"] | {"exclude_modules": fresh["quantization"]["exclude_modules"]}}
    write_quant_configs(dest, small, meta)
