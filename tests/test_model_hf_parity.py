"""HybridLM against transformers' NemotronHForCausalLM: logits, save/load both ways, generation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import hf_model, randomize, tiny_config

from star_elastic import HybridLM, load_model, save_model
from star_elastic.infer.generate import GenerationConfig, generate

CONFIGS = {
    "all-blocks": {},
    "groups4-untied-chunk16": dict(n_groups=4, chunk_size=16),
    "one-group-top4": dict(n_groups=1, mamba_num_heads=4, num_experts_per_tok=4),
    "mamba-heavy-bias": dict(pattern="MMEM*", use_conv_bias=False, mamba_proj_bias=True, n_groups=8),
    "mlp-gqa1-bias": dict(pattern="*-*E", num_key_value_heads=1, mlp_bias=True),
}


def parity_config(**changes):
    """transformers' full forward before 5.25 clamps dt at `time_step_min`, where we (and vLLM) follow
    `time_step_limit` (0, inf). With time_step_min = 1e-9 that clamp cannot trigger on these random
    weights (it would need dt + dt_bias < -20), so parity compares the same function; the
    deviation itself is pinned by test_dt_follows_time_step_limit_not_transformers_time_step_min."""
    return tiny_config(time_step_min=1e-9, **changes)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length", [1, 7, 19])
def test_load_hf_checkpoint_matches_transformers(tmp_path, name, length):
    ref = randomize(hf_model(parity_config(**CONFIGS[name])))
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 97, (2, length))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(ref, ids), atol=1e-4, rtol=0)


def test_tied_head_round_trip_through_transformers(tmp_path):
    cfg = parity_config(tie_word_embeddings=True)
    ours = randomize(HybridLM(cfg)).eval()
    assert ours.lm_head.weight is ours.backbone.embeddings.weight
    save_model(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(ref, ids), ours(ids), atol=1e-4, rtol=0)
    again = load_model(tmp_path)
    assert again.lm_head.weight is again.backbone.embeddings.weight


@pytest.mark.parametrize("name", ["all-blocks", "mamba-heavy-bias"])
def test_save_then_transformers_loads_identical_logits(tmp_path, name):
    ours = randomize(HybridLM(parity_config(**CONFIGS[name])), seed=3).eval()
    save_model(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hybrid_override_pattern"] == ours.config.pattern
    assert cfg["num_hidden_layers"] == len(ours.config.pattern)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(ref, ids), ours(ids), atol=1e-4, rtol=0)


def test_layers_block_type_and_sharded_checkpoint(tmp_path):
    ours = randomize(HybridLM(parity_config()), seed=5).eval()
    save_model(ours, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["hybrid_override_pattern"], cfg["num_hidden_layers"]  # the newer style only
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    again = load_model(tmp_path)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(ref, ids), ours(ids), atol=1e-4, rtol=0)


def test_bf16_close_to_transformers_bf16(tmp_path):
    ref = randomize(hf_model(parity_config(moe_intermediate_size=16)), scale=0.1)  # HF bf16 experts need 16-byte strides
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        a, b = ours(ids), hf_logits(ref, ids).float()
    assert ours.backbone.embeddings.weight.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; both implementations round at slightly different places
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


def test_greedy_generation_equals_transformers_generate(tmp_path):
    ref = randomize(hf_model(parity_config()), scale=0.5)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    prompt = [5, 17, 33, 2, 61, 8, 40]
    with torch.no_grad():
        hf_out = ref.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    mine = generate(ours, [prompt], GenerationConfig(max_new_tokens=15))[0]
    assert mine == hf_out[0, len(prompt):].tolist()


def test_bf16_checkpoint_keeps_correction_bias_fp32_like_transformers(tmp_path):
    ours = randomize(HybridLM(parity_config()))
    bias = ours.backbone.layers[2].mixer.gate.e_score_correction_bias.clone()
    save_model(ours.to(torch.bfloat16), tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ref_bias = ref.model.layers[2].mixer.gate.e_score_correction_bias
    assert ref.model.embeddings.weight.dtype == torch.bfloat16
    assert ref_bias.dtype == torch.float32 and torch.equal(ref_bias, bias)  # no BF16 rounding on the way
    assert torch.equal(load_model(tmp_path).backbone.layers[2].mixer.gate.e_score_correction_bias, bias)


def _mixers(hf):
    return [layer.mixer for layer in hf.model.layers if hasattr(layer.mixer, "time_step_limit")]


@pytest.mark.parametrize("limit", [None, (0.02, 0.3)])
def test_dt_follows_time_step_limit_not_transformers_time_step_min(tmp_path, limit):
    """dt_bias = -9 puts most softplus(dt + dt_bias) below time_step_min (1e-3). transformers before
    5.25 clamps them up to 1e-3 in its full forward (its mixers' `time_step_limit` is (time_step_min,
    inf)) and differs from us; 5.25 follows the config's time_step_limit, as we do. Either way,
    transformers' mixer using the config's time_step_limit (what its cached decode step, vLLM and
    mamba_ssm use) agrees with us."""
    changes = {} if limit is None else {"time_step_limit": limit}
    ref = randomize(hf_model(tiny_config(pattern="MM*M", **changes)))
    with torch.no_grad():
        for m in _mixers(ref):
            m.dt_bias.fill_(-9.0)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.time_step_limit == (limit or (0.0, float("inf")))
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        mine, theirs = ours(ids), hf_logits(ref, ids)
        if any(tuple(m.time_step_limit) != tuple(ref.config.time_step_limit) for m in _mixers(ref)):
            assert (mine - theirs).abs().max() > 1e-2  # the known deviation of transformers < 5.25, pinned
        for m in _mixers(ref):
            m.time_step_limit = tuple(ref.config.time_step_limit)
        torch.testing.assert_close(mine, hf_logits(ref, ids), atol=1e-4, rtol=0)
    save_model(ours, tmp_path / "again")  # and we write it back for vLLM / transformers to read
    assert tuple(transformers.AutoConfig.from_pretrained(tmp_path / "again").time_step_limit) == ours.config.time_step_limit
    assert load_model(tmp_path / "again").config.time_step_limit == ours.config.time_step_limit
