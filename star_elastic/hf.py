"""Load and save the Hugging Face `nemotron_h` checkpoint layout (safetensors only).

On disk (NVIDIA's layout, which transformers reads and writes):
    backbone.embeddings.weight, backbone.layers.N.norm.weight, backbone.layers.N.mixer.<param>,
    backbone.layers.N.mixer.experts.E.{up,down}_proj.weight   (one tensor per expert)
    backbone.norm_f.weight, lm_head.weight
In memory, `HybridLM` keeps the same names except that each layer's experts are stacked into
`mixer.experts.{up,down}_proj` (E, ...) tensors. `disk_to_model_keys` is the whole map; a key it
cannot place, a missing key, or a shape mismatch raises `CheckpointError` naming file and key.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from star_elastic.config import ConfigError, ModelConfig
from star_elastic.model.hybrid import HybridLM
from star_elastic.model.moe import keeps_fp32
from star_elastic.quant.load import dequantize_tensors, install_input_quant, quant_format, read_quant_config

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the key."""


# --- the key map ------------------------------------------------------------------------------
def expected_disk_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every on-disk key of a `cfg` checkpoint → (shape, model key) built from a meta model."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, t in model.state_dict().items():
        if key.endswith(("experts.up_proj", "experts.down_proj")):
            prefix, leaf = key.rsplit(".", 1)
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{leaf}.weight"] = (tuple(t.shape[1:]), key)
        else:
            out[key] = (tuple(t.shape), key)
    return out


def _normalise_key(key: str) -> str:
    """Accept transformers' in-memory prefix `model.` as an alias of `backbone.`."""
    return "backbone." + key[len("model.") :] if key.startswith("model.") else key


# --- reading ----------------------------------------------------------------------------------
def _weight_files(path: Path) -> dict[str, list[str]]:
    """File name → keys it should hold (from the index for sharded checkpoints)."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{path / INDEX}: not a valid safetensors index ({err})") from None
        files: dict[str, list[str]] = defaultdict(list)
        for key, name in weight_map.items():
            files[name].append(key)
        for name in files:
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: listed in {INDEX} (e.g. for {files[name][0]}) but missing")
        return dict(files)
    if (path / WEIGHTS).is_file():
        return {WEIGHTS: []}
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {pickles}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {WEIGHTS} or {INDEX}{hint}")


def _read_tensors(path: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """All tensors of the checkpoint: normalised key → (tensor, file name)."""
    tensors: dict[str, tuple[torch.Tensor, str]] = {}
    for name, indexed_keys in _weight_files(path).items():
        try:
            with safe_open(str(path / name), framework="pt") as f:
                keys = list(f.keys())
                missing = sorted(set(indexed_keys) - set(keys))
                if missing:
                    raise CheckpointError(f"{path / name}: {INDEX} lists {missing[0]} but the file lacks it")
                for key in keys:
                    tensors[_normalise_key(key)] = (f.get_tensor(key), name)
        except SafetensorError as err:
            raise CheckpointError(f"{path / name}: unreadable safetensors file, truncated or corrupt ({err})") from None
    return tensors


def checkpoint_keys(path: Path) -> dict[str, str]:
    """Every on-disk key (as stored) → its file name; reads headers only."""
    keys = {}
    for name in _weight_files(path):
        try:
            with safe_open(str(path / name), framework="pt") as f:
                keys.update({key: name for key in f.keys()})
        except SafetensorError as err:
            raise CheckpointError(f"{path / name}: unreadable safetensors file, truncated or corrupt ({err})") from None
    return keys


def iter_tensors(path: Path):
    """Yield (normalised key, tensor, file name) one tensor at a time, file by file (streaming)."""
    for name in _weight_files(path):
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    yield _normalise_key(key), f.get_tensor(key), name
        except SafetensorError as err:
            raise CheckpointError(f"{path / name}: unreadable safetensors file, truncated or corrupt ({err})") from None


def _assemble(cfg: ModelConfig, tensors: dict[str, tuple[torch.Tensor, str]], path: Path) -> dict[str, torch.Tensor]:
    """Map on-disk tensors to the model's state dict, checking every key and shape."""
    expected = expected_disk_shapes(cfg)
    stacked: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    state: dict[str, torch.Tensor] = {}
    for key, (t, fname) in tensors.items():
        if key in ("lm_head.weight",) and cfg.tie_word_embeddings:
            state["lm_head.weight"] = t
            continue
        if key not in expected:
            raise CheckpointError(f"{path / fname}: unexpected tensor {key!r} for this config (pattern {cfg.pattern})")
        shape, model_key = expected[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{path / fname}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
        match = _EXPERT.match(key)
        if match:
            stacked[model_key][int(match.group(2))] = t
        else:
            state[model_key] = t
    missing = sorted(k for k in expected if k not in tensors and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    for model_key, parts in stacked.items():
        state[model_key] = torch.stack([parts[e] for e in range(len(parts))])
    return state


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> HybridLM:
    """Load a transformers `nemotron_h` checkpoint directory into a `HybridLM`.

    dtype None keeps the checkpoint's dtype (that of the embeddings); the router's correction
    bias always stays fp32, as transformers keeps it.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    check_transformers_version()
    cfg = ModelConfig.from_json(path / "config.json")
    tensors = _read_tensors(path)
    quant = read_quant_config(path)
    input_scales = {}
    if quant is not None:  # a quantized checkpoint: dequantize here, emulate input quantization below
        tensors, input_scales = dequantize_tensors(tensors, quant, path, dtype or torch.float32)
    state = _assemble(cfg, tensors, path)
    dtype = dtype or state["backbone.embeddings.weight"].dtype
    tied_head = state.get("lm_head.weight") if cfg.tie_word_embeddings else None
    if tied_head is not None and not torch.equal(tied_head, state["backbone.embeddings.weight"]):
        # transformers 5.x ties nothing in nemotron_h: it loads the stored head as it is
        warnings.warn(f"{path}: tie_word_embeddings is true but lm_head.weight differs from the embeddings; "
                      "loading the stored head untied, as transformers does", stacklevel=2)
        cfg = cfg.replace(tie_word_embeddings=False)
    elif tied_head is not None:
        state.pop("lm_head.weight")
    for key, t in state.items():
        state[key] = t.to(device=device, dtype=torch.float32 if keeps_fp32(key) else dtype)
    model = HybridLM.from_state_dict(cfg, state, _load_tokenizer(path))
    if input_scales:
        install_input_quant(model, input_scales, quant_format(quant))
    return model.eval()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_transformers_version() -> None:
    """transformers 4.x has no `nemotron_h` (it cannot load these checkpoints or their tokenizer files)."""
    version = _transformers_version()
    if int(version.split(".")[0]) < 5:
        raise ConfigError(f"transformers {version} is installed; nemotron_h checkpoints need "
                          "transformers >= 5 (4.x does not know model_type nemotron_h): pip install 'transformers>=5,<6'")


def _load_tokenizer(path: Path):
    if not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# --- writing ----------------------------------------------------------------------------------
def to_disk_state(model: HybridLM) -> dict[str, torch.Tensor]:
    """The model's tensors under their on-disk names (experts split, head always written)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key.endswith(("experts.up_proj", "experts.down_proj")):
            prefix, leaf = key.rsplit(".", 1)
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{leaf}.weight"] = t[e].contiguous()
        else:
            # transformers' nemotron_h never ties the head, so a tied head is written out too
            out[key] = t.detach().clone() if key == "lm_head.weight" and model.config.tie_word_embeddings else t.contiguous()
    return out


def write_config(cfg: ModelConfig, path: Path, dtype: torch.dtype, extra: dict | None = None) -> None:
    d = cfg.to_hf_dict() | {"dtype": str(dtype).removeprefix("torch.")} | (extra or {})
    _atomic_write_text(path / "config.json", json.dumps(d, indent=2) + "\n")


GENERATION_MAX_LENGTH = 512
"""generation_config.json's `max_length` (prompt + new tokens): room for a demo prompt, trace and
answer, so a bare transformers `generate()` reaches `</think>` (its built-in default is 20). Not
`max_new_tokens`: transformers lets a stored max_new_tokens override a caller's `max_length`, which
is how lm-eval passes its `max_gen_toks`; a stored max_length yields to both."""


def write_generation_config(cfg: ModelConfig, path: Path) -> None:
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
           "max_length": GENERATION_MAX_LENGTH}
    _atomic_write_text(path / "generation_config.json", json.dumps(gen, indent=2) + "\n")


def save_model(model: HybridLM, path: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write config.json, safetensors weights (sharded above `max_shard_bytes`) and the tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(path, max_shard_bytes)
    for key, t in to_disk_state(model).items():
        writer.add(key, t)
    writer.close()
    write_config(model.config, path, model.dtype)
    write_generation_config(model.config, path)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path))


class ShardWriter:
    """Writes tensors as they come into safetensors shards of at most `max_bytes` (one held at a time;
    None: a single file). A tensor larger than `max_bytes` gets a shard of its own.

    `close()` names the shards `model-0000i-of-0000n.safetensors` and writes the index, or a single
    `model.safetensors` when everything fit in one shard.
    """

    def __init__(self, path: Path, max_bytes: int | None):
        self.path, self.max_bytes = path, max_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes, self.total_bytes = 0, 0
        self.files: list[tuple[Path, list[str]]] = []
        self.written_keys: list[str] = []
        self.peak_bytes = 0  # most tensor bytes held at once (the streaming bound the tests pin)

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.shard and self.max_bytes is not None and self.shard_bytes + nbytes > self.max_bytes:
            self.flush()
        self.shard[key] = t.detach().cpu().contiguous()
        self.written_keys.append(key)
        self.shard_bytes += nbytes
        self.total_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.shard_bytes)

    def flush(self) -> None:
        if not self.shard:
            return
        target = self.path / f"part-{len(self.files):05d}.safetensors"
        atomic_save(self.shard, target)
        self.files.append((target, list(self.shard)))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.path / WEIGHTS)
            return
        weight_map = {}
        for i, (part, keys) in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(part, self.path / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        _atomic_write_text(self.path / INDEX, json.dumps(index, indent=2))


def atomic_save(tensors: dict[str, torch.Tensor], target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)


def _atomic_write_text(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


__all__ = ["CheckpointError", "ConfigError", "load_model", "save_model", "expected_disk_shapes", "to_disk_state"]
