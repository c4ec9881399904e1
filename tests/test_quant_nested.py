"""Quantization keeps nesting: packed slices, masked fake-quant == loaded quantized slice, layout."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import tiny_elastic
from safetensors.torch import load_file

from star_elastic import load_model
from star_elastic.config import ConfigError, QuantConfig, from_dict
from star_elastic.elastic.arch import IndexSets, slice_model
from star_elastic.quant import formats
from star_elastic.quant.export import quant_metadata, quantized_state, slice_packed, write_quantized
from star_elastic.quant.fake import apply_fake_quant, set_mode


def bf16_rounded(elastic):
    """The exported checkpoint stores unquantized tensors in BF16: start from BF16 values."""
    with torch.no_grad():
        for p in elastic.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return elastic


def quantized_elastic(fmt: str, seed: int = 0):
    elastic = bf16_rounded(tiny_elastic(seed=seed))
    fq = copy.deepcopy(elastic.model)
    qcfg = QuantConfig(format=fmt)
    quantizers = apply_fake_quant(fq, qcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # calibrate over every budget: one static scale serves all slices
        for b in elastic.ecfg.budgets:
            masks = IndexSets.prefix(fq.config, elastic.architecture(b)).masks()
            fq(torch.randint(0, fq.config.vocab_size, (2, 16), generator=g), masks=masks)
    set_mode(quantizers, "quantize")
    return elastic, fq, qcfg, quantizers


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_masked_fake_quant_equals_loaded_quantized_slice(tmp_path, fmt):
    reduced = set()
    for seed in range(3):  # different routers: together their picks shrink every width axis
        torch.manual_seed(seed)
        elastic, fq, qcfg, quantizers = quantized_elastic(fmt, seed=seed)
        tensors = quantized_state(fq, qcfg, quantizers)
        ids = torch.randint(0, fq.config.vocab_size, (2, 12))
        for b in elastic.ecfg.budgets:
            arch = elastic.architecture(b)
            full = dataclasses.asdict(elastic.architecture(1.0))
            reduced |= {axis for axis, size in dataclasses.asdict(arch).items() if axis != "layers" and size < full[axis]}
            out = tmp_path / f"slice-{seed}-{b}"
            write_quantized(out, arch.model_config(fq.config), slice_packed(tensors, fq.config, arch, fmt),
                            quant_metadata(qcfg, arch.model_config(fq.config)))
            sliced = load_model(out)
            with torch.no_grad():
                masked = fq(ids, masks=IndexSets.prefix(fq.config, arch).masks())
                torch.testing.assert_close(sliced(ids), masked, atol=1e-4, rtol=0)
    assert {"hidden", "attn_heads", "mamba_heads", "experts", "expert_inter", "shared_inter", "mlp_inter"} <= reduced


def test_slice_then_quantize_equals_quantize_then_slice_on_packed_bytes():
    elastic, fq, qcfg, quantizers = quantized_elastic("nvfp4", seed=1)
    full = quantized_state(fq, qcfg, quantizers)
    arch = elastic.architecture(0.5)
    packed_slice = slice_packed(full, fq.config, arch, "nvfp4")
    small = slice_model(elastic.model, arch)  # BF16 slice of the unquantized weights
    checked = 0
    for key, t in packed_slice.items():
        if not key.endswith(".weight") or t.dtype != torch.uint8:
            continue
        module = key.rsplit(".", 1)[0]
        if ".experts." in module:
            layer, rest = module.split(".mixer.experts.")
            e, which = rest.split(".")
            w = getattr(small.get_submodule(f"{layer}.mixer.experts"), which)[int(e)]
        else:
            w = small.get_submodule(module).weight
        gs = packed_slice[f"{module}.weight_scale_2"]  # the full tensor's global scale
        p, s, _ = formats.quantize_nvfp4(w.detach(), global_scale=gs)
        assert torch.equal(t, p), key
        assert torch.equal(packed_slice[f"{module}.weight_scale"].view(torch.uint8), s.view(torch.uint8)), key
        checked += 1
    assert checked >= 10


def test_export_layout(tmp_path):
    elastic, fq, qcfg, quantizers = quantized_elastic("nvfp4")
    tensors = quantized_state(fq, qcfg, quantizers)
    write_quantized(tmp_path, fq.config, tensors, quant_metadata(qcfg, fq.config))
    meta = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
    assert meta["quant_algo"] == "NVFP4" and meta["group_size"] == 16
    assert {"backbone.layers.1.mixer.q_proj", "backbone.layers.6.mixer.v_proj", "lm_head"} <= set(meta["exclude_modules"])
    assert not any("*" in m or m.endswith(".gate") for m in meta["exclude_modules"])  # explicit names (what vLLM matches)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_algo"] == "NVFP4" and cfg["quantization_config"]["quant_method"] == "modelopt"
    assert cfg["quantization_config"]["ignore"] == meta["exclude_modules"]
    disk = load_file(tmp_path / "model.safetensors")
    C = fq.config.hidden_size
    up = "backbone.layers.2.mixer.experts.3.up_proj"
    assert disk[f"{up}.weight"].dtype == torch.uint8 and disk[f"{up}.weight"].shape == (32, C // 2)
    assert disk[f"{up}.weight_scale"].dtype == torch.float8_e4m3fn and disk[f"{up}.weight_scale"].shape == (32, C // 16)
    assert disk[f"{up}.weight_scale_2"].shape == () and disk[f"{up}.input_scale"].dtype == torch.float32
    assert disk["backbone.layers.1.mixer.q_proj.weight"].dtype == torch.bfloat16  # attention stays high precision
    bias = "backbone.layers.2.mixer.gate.e_score_correction_bias"  # routing ties: kept fp32, bit for bit
    assert disk[bias].dtype == torch.float32 and torch.equal(disk[bias], fq.get_submodule(bias.rsplit(".", 1)[0]).e_score_correction_bias)
    assert disk["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.uint8  # Mamba projections quantized


def test_bad_quant_configs():
    with pytest.raises(ConfigError, match=r"format must be one of \['fp8', 'nvfp4'\], got 'int4'"):
        QuantConfig(format="int4")
    elastic = tiny_elastic()
    with pytest.raises(ConfigError, match="match no module"):
        apply_fake_quant(copy.deepcopy(elastic.model), QuantConfig(include=("*.nothing",)))


@pytest.fixture(scope="module")
def skewed_run(tmp_path_factory):
    """An untrained elastic run (steps 0) of the tiny parent, elastified with stage-2 probabilities 0.2 / 0.3 / 0.5."""
    from test_elastify import config, save_tiny_parent

    from star_elastic.train.elastify import train

    root = tmp_path_factory.mktemp("qad")
    train(config(save_tiny_parent(root / "parent"), root / "run", steps=0, stage2_probs=(0.2, 0.3, 0.5)),
          log=lambda m: None)
    return root / "run"


def test_qad_samples_budgets_with_the_runs_stage2_probabilities(skewed_run, tmp_path):
    """QAD's budget probabilities are the ones the run was elastified with (RUN/elastify_config.json);
    a run without that record gets elastify's default for its number of budgets (two: 0.6 / 0.4);
    budget_probs given explicitly win."""
    from star_elastic.quant.qad import QuantizeConfig, budget_probs

    cfg = QuantizeConfig(quant=QuantConfig(format="fp8"))
    budgets = tuple(json.loads((skewed_run / "run.json").read_text())["elastic"]["budgets"])
    assert len(budgets) == 3 and budget_probs(cfg, skewed_run, budgets) == [0.2, 0.3, 0.5]
    bare = tmp_path / "bare"
    bare.mkdir()
    assert budget_probs(cfg, bare, (1.0, 0.5)) == pytest.approx([0.6, 0.4])
    assert budget_probs(cfg, bare, budgets) == pytest.approx([0.5, 0.3, 0.2])
    assert budget_probs(dataclasses.replace(cfg, budget_probs=(0.1, 0.1, 0.8)), skewed_run, budgets) == [0.1, 0.1, 0.8]


def test_qad_resume_continues_only_the_same_quantize_run(skewed_run, tmp_path):
    """QRUN is kept as elastify's run folder is: a started QAD is not overwritten unasked, and a
    resume refuses a key that shapes the result (lr, the quant block) but takes another engine."""
    from star_elastic.quant.qad import QuantizeConfig, quantize_run

    def run(**changes):
        cfg = {"run": str(skewed_run), "out": str(tmp_path / "q"), "quant": {"format": "fp8"}, "qad_steps": 2,
               "batch_size": 2, "seq_len": 16, "calibration_batches": 1, "n_synthetic": 50} | changes
        return quantize_run(from_dict(QuantizeConfig, cfg), log=lambda m: None)

    with pytest.raises(ConfigError, match="is the run being quantized"):
        run(out=str(skewed_run), overwrite=True)
    assert not run(stop_after=1)["finished"]
    with pytest.raises(ConfigError, match="holds an earlier run; resume to continue it"):
        run()
    with pytest.raises(ConfigError, match=r"resume: lr changed since .*: 2e-05 → 0.001"):
        run(resume=True, lr=1e-3)
    with pytest.raises(ConfigError, match="resume: quant.format changed since .*: 'fp8' → 'nvfp4'"):
        run(resume=True, quant={"format": "nvfp4"})
    resumed = run(resume=True, engine={"micro_batch_size": 1})
    assert resumed["finished"] and len(resumed["qad_loss_first"]) == 2
    assert (tmp_path / "q" / "quantize_config.json").is_file() and (tmp_path / "q" / "model").is_dir()
