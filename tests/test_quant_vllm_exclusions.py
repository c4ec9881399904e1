"""Exported `exclude_modules` read the way vLLM reads them (star_elastic/quant/vllm_rule.py: vLLM 0.32's matcher,
re-implemented).

For every module vLLM builds from a checkpoint (q/k/v fused into qkv_proj, one experts module per
MoE layer), vLLM's verdict "excluded" must equal "stored unquantized" in the safetensors. The same
rule is checked against the real vLLM by `make interop`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_elastic
from safetensors.torch import load_file

from star_elastic.config import QuantConfig
from star_elastic.elastic.arch import Architecture
from star_elastic.quant.export import quant_metadata, quantized_state, slice_packed, write_quantized
from star_elastic.quant.fake import apply_fake_quant, set_mode
from star_elastic.quant.vllm_rule import is_excluded, vllm_modules, vllm_patterns


def stored_quantized(tensors: dict[str, torch.Tensor]) -> dict[str, bool]:
    """HF module of every 2D weight → stored as FP8 / packed NVFP4."""
    return {k.removesuffix(".weight"): t.dtype in (torch.uint8, torch.float8_e4m3fn)
            for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 2}


def disagreements(tensors: dict[str, torch.Tensor], meta: dict) -> list[str]:
    patterns = vllm_patterns(meta["quantization"]["exclude_modules"])
    stored = stored_quantized(tensors)
    bad = []
    for vname, parts in vllm_modules(sorted(stored)).items():
        if vname.endswith((".embed_tokens", ".mixer.gate")):
            continue  # vLLM gives neither a quant method (embedding, GateLinear)
        quantized = {stored[p] for p in parts}
        if len(quantized) != 1 or is_excluded(vname, patterns) == quantized.pop():
            bad.append(vname)
    return bad


def export(fmt: str, qcfg: QuantConfig):
    elastic = tiny_elastic()
    fq = copy.deepcopy(elastic.model)
    quantizers = apply_fake_quant(fq, qcfg)
    with torch.no_grad():
        fq(torch.randint(0, fq.config.vocab_size, (2, 16)))
    set_mode(quantizers, "quantize")
    return elastic, fq, quantized_state(fq, qcfg, quantizers)


QCFGS = {"default": {}, "no-experts-no-mamba-in": {"exclude": ("*.mixer.experts", "*.mixer.in_proj")},
         "attention-too": {"include": ("*.mixer.q_proj", "*.mixer.k_proj", "*.mixer.v_proj", "*.mixer.up_proj")}}


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("which", sorted(QCFGS))
def test_vllm_reads_every_exclusion_right(fmt, which):
    qcfg = QuantConfig(format=fmt, **QCFGS[which])
    elastic, fq, tensors = export(fmt, qcfg)
    meta = quant_metadata(qcfg, fq.config)
    assert disagreements(tensors, meta) == []
    patterns = vllm_patterns(meta["quantization"]["exclude_modules"])
    assert is_excluded("lm_head", patterns)
    assert is_excluded("model.layers.1.mixer.qkv_proj", patterns) == (which != "attention-too")


def test_depth_sliced_export_names_the_renumbered_layers(tmp_path):
    qcfg = QuantConfig(format="fp8")
    elastic, fq, tensors = export("fp8", qcfg)
    cfg = fq.config
    full = elastic.architecture(1.0)
    arch = Architecture(**(full.__dict__ | {"layers": tuple(i for i in full.layers if i != 0)}))  # drop a Mamba layer
    small = arch.model_config(cfg)
    sliced = slice_packed(tensors, cfg, arch, "fp8")
    assert disagreements(sliced, quant_metadata(qcfg, small)) == []
    assert disagreements(sliced, quant_metadata(qcfg, cfg)) != []  # the parent's numbering would be read wrongly
    write_quantized(tmp_path, small, sliced, quant_metadata(qcfg, small))
    assert disagreements(load_file(tmp_path / "model.safetensors"), quant_metadata(qcfg, small)) == []


def test_layer_wildcards_are_not_matched_by_vllm():
    """The old export's patterns: vLLM fuses q/k/v and never matches `layers.*.mixer.q_proj` to them."""
    old = vllm_patterns(["backbone.layers.*.mixer.q_proj", "backbone.layers.*.mixer.k_proj",
                         "backbone.layers.*.mixer.v_proj", "backbone.layers.*.mixer.o_proj", "lm_head"])
    assert not is_excluded("model.layers.1.mixer.qkv_proj", old)
    assert is_excluded("model.layers.1.mixer.o_proj", old)  # fnmatch does match unfused names
    modelopt = vllm_patterns(["backbone.layers.1.mixer*"])  # ModelOpt's whole-subtree form
    assert is_excluded("model.layers.1.mixer.qkv_proj", modelopt) and not is_excluded("model.layers.11.mixer.in_proj", modelopt)
