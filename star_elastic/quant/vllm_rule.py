"""vLLM's rule for "is this module excluded from quantization", re-implemented for nemotron_h.

An exact re-implementation of what vLLM 0.32.0 applies when it loads a ModelOpt checkpoint
(`vllm/model_executor/layers/quantization/modelopt.py`: `ModelOptQuantConfigBase.apply_vllm_mapper`
and `.is_layer_excluded`; `quantization/utils/quant_utils.py`: `is_layer_skipped` in "exact" mode;
`models/nemotron_h.py`: `NemotronHForCausalLM.hf_to_vllm_mapper` renames and
`packed_modules_mapping`). It lets the test suite (and anyone holding an export) check our
`exclude_modules` without vLLM; `make interop` (interop/check_vllm.py) checks it, verdict by verdict,
against the real vLLM.

vLLM asks the rule for its own module names: `model.` for `backbone.`, q/k/v fused into
`qkv_proj`, one `mixer.experts` module per MoE layer (see `vllm_modules`).
"""

from __future__ import annotations

from fnmatch import fnmatch

PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
_RENAME_SUBSTR = {"A_log": "A", "embeddings": "embed_tokens"}
_RENAME_PREFIX = {"backbone": "model"}  # the mapper's `mtp: None` is dropped for module lists


def to_vllm_name(name: str) -> str:
    """HF name → vLLM name through the rename-only mapper (each rule once, in vLLM's order)."""
    for old, new in _RENAME_SUBSTR.items():
        if old in name:
            name = name.replace(old, new, 1)
    for old, new in _RENAME_PREFIX.items():
        if name.startswith(old):
            name = name.replace(old, new, 1)
    return name


def vllm_patterns(exclude_modules: list[str]) -> list[str]:
    """`apply_vllm_mapper`: ModelOpt's `path*` becomes `path` and `path.*`, then names are renamed."""
    split = []
    for p in exclude_modules:
        split += [p[:-1], p[:-1] + ".*"] if len(p) >= 2 and p[-1] == "*" and p[-2] != "." else [p]
    return [to_vllm_name(p) for p in split]


def _skipped(prefix: str, ignored: list[str]) -> bool:
    """`is_layer_skipped(prefix, ignored, PACKED)` in exact mode."""
    proj = prefix.split(".")[-1]
    if proj in PACKED and prefix in ignored:
        return True
    if proj in PACKED:
        verdicts = {prefix.replace(proj, shard) in ignored for shard in PACKED[proj]}
        if len(verdicts) > 1:
            raise ValueError(f"Detected some but not all shards of {prefix} are quantized")
        return verdicts.pop()
    if "experts" in prefix:
        return any(prefix in name for name in ignored if "experts" in name)
    return prefix in ignored


def is_excluded(prefix: str, patterns: list[str]) -> bool:
    """`is_layer_excluded(prefix)` after `apply_vllm_mapper` (pass `vllm_patterns(...)`)."""
    if not patterns:
        return False
    if _skipped(prefix, patterns):
        return True
    if any(p != prefix and (p in prefix or (prefix.startswith("language_model.") and p in prefix.removeprefix("language_model.")))
           for p in patterns):
        return True
    return any(fnmatch(prefix, p) for p in patterns)


def vllm_modules(hf_linears: list[str]) -> dict[str, list[str]]:
    """vLLM module name → the HF modules it is built from (q/k/v → qkv_proj; experts.E.* → experts)."""
    out: dict[str, list[str]] = {}
    for name in hf_linears:
        v = to_vllm_name(name)
        for shard in PACKED["qkv_proj"]:
            if v.endswith(f".mixer.{shard}"):
                v = v.removesuffix(shard) + "qkv_proj"
        if ".mixer.experts." in v:
            v = v.split(".mixer.experts.")[0] + ".mixer.experts"
        out.setdefault(v, []).append(name)
    return out
