"""Every bad checkpoint gives one error naming the file and the key; nothing loads partially."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from star_elastic import CheckpointError, ConfigError, HybridLM, load_model, save_model


@pytest.fixture
def ckpt(tmp_path):
    save_model(HybridLM(tiny_config()).init_weights(1), tmp_path)
    return tmp_path


def rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_unsupported_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text()) | {"model_type": "llama"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: model_type 'llama' is not supported"):
        load_model(ckpt)


def test_missing_weight_file_and_pickle_hint(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        load_model(ckpt)


def test_truncated_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable safetensors file"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("backbone.layers.2.mixer.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'backbone.layers.2.mixer.experts.3.up_proj.weight'"):
        load_model(ckpt)


def test_misshaped_tensor(ckpt):
    def shrink(t):
        t["backbone.layers.0.mixer.in_proj.weight"] = t["backbone.layers.0.mixer.in_proj.weight"][:-1].contiguous()

    rewrite(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'backbone.layers.0.mixer.in_proj.weight' has shape"):
        load_model(ckpt)


def test_unknown_key(ckpt):
    rewrite(ckpt, lambda t: t.update({"backbone.layers.0.mixer.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'backbone.layers.0.mixer.extra.weight'"):
        load_model(ckpt)


def test_sharded_index_pointing_to_missing_file(tmp_path):
    save_model(HybridLM(tiny_config()).init_weights(1), tmp_path, max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: listed in model.safetensors.index.json"):
        load_model(tmp_path)


def test_layer_count_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["layers_block_type"]
    cfg["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_hidden_layers=3 but hybrid_override_pattern has 8 layers"):
        load_model(ckpt)


def test_tied_head_that_differs_loads_untied_as_transformers_does(tmp_path):
    import transformers

    save_model(HybridLM(tiny_config(tie_word_embeddings=True)).init_weights(1), tmp_path)
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.warns(UserWarning, match="lm_head.weight differs from the embeddings; loading the stored head untied"):
        model = load_model(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)
