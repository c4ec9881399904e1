"""Meta-device loading (distributed/loading.py) against the whole-model path: load_model + sort_model.

The two-process case (FSDP2 shards filled rank by rank, gathered back) is in test_distributed.py;
here one process checks the per-tensor stream itself, on sharded checkpoint files, a tied head and
random importance scores, and the row restriction each rank applies.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, tiny_config

from star_elastic.config import QuantConfig
from star_elastic.distributed.loading import fill_from_checkpoint, meta_model, rows_rule
from star_elastic.elastic.arch import gather
from star_elastic.elastic.sort import expected_shapes, sort_model, sort_rules
from star_elastic.hf import CheckpointError, load_model, save_model
from star_elastic.model.hybrid import HybridLM
from star_elastic.quant.fake import apply_fake_quant


def _random_scores(cfg, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(shape, generator=g) for k, shape in expected_shapes(cfg).items()}


def _filled(path, rule=None) -> HybridLM:
    model = meta_model(path)
    model.to_empty(device="cpu")
    fill_from_checkpoint(model, path, rule)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_sorted_parent_equals_load_then_sort(tmp_path, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    save_model(randomize(HybridLM(cfg), seed=3), tmp_path, max_shard_bytes=20_000)
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]  # several files
    scores = _random_scores(cfg)
    want = sort_model(load_model(tmp_path), scores).state_dict()
    filled = _filled(tmp_path, sort_rules(cfg, scores))
    assert (filled.lm_head.weight is filled.backbone.embeddings.weight) == tied
    got = filled.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    unsorted = _filled(tmp_path).state_dict()
    assert all(torch.equal(unsorted[k], v) for k, v in load_model(tmp_path).state_dict().items())


def test_rows_rule_keeps_only_a_shards_rows():
    cfg = tiny_config()
    scores = _random_scores(cfg, seed=1)
    rule = sort_rules(cfg, scores)
    model = randomize(HybridLM(cfg), seed=2)
    rows = torch.tensor([5, 0, 6])  # any dim-0 positions, e.g. one rank's chunk
    for key, t in model.state_dict().items():
        r = rule(key)
        if t.shape[0] > 6:
            assert torch.equal(gather(t, rows_rule(r, rows)), gather(t, r)[rows]), key
    expert_key = next(k for k in model.state_dict() if k.endswith("experts.up_proj"))
    assert any(idx.dim() == 2 for idx in rule(expert_key).values())  # the per-expert order was exercised


def test_missing_tensor_names_the_key(tmp_path):
    cfg = tiny_config()
    state = {k: v for k, v in randomize(HybridLM(cfg)).state_dict().items()}
    model = HybridLM.from_state_dict(cfg, state)
    save_model(model, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors.pop("backbone.layers.2.mixer.experts.3.down_proj.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'backbone\.layers\.2\.mixer\.experts\.3\.down_proj"):
        _filled(tmp_path)


def test_fake_quantized_meta_model_is_filled_with_the_master_weights(tmp_path):
    """QAD's student under meta loading: fake-quantized on the meta device (parametrized weights are
    `parametrizations.weight.original`), then filled from the files. Its state and its logits equal
    the model loaded whole and fake-quantized afterwards (the parametrization quantizes the filled
    weights, per-tensor scales of the full tensors)."""
    cfg = tiny_config(tie_word_embeddings=True)
    save_model(randomize(HybridLM(cfg), seed=4), tmp_path, max_shard_bytes=20_000)
    qcfg = QuantConfig(format="fp8", activations=False)
    whole = load_model(tmp_path)
    apply_fake_quant(whole, qcfg)
    meta = meta_model(tmp_path)
    apply_fake_quant(meta, qcfg)
    meta.to_empty(device="cpu")
    fill_from_checkpoint(meta, tmp_path)
    want, got = whole.state_dict(), meta.state_dict()
    assert got.keys() == want.keys() and any(".parametrizations.weight.original" in k for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(meta(ids), whole(ids))
