"""The parent shipped inside the package (star_elastic/assets/parent): it loads, transformers reads it
the same, and it solves held-out problems (answers recomputed from the prompts by data/synthetic.py)."""

from __future__ import annotations

import json

import torch

from star_elastic.assets import PARENT, sha256
from star_elastic.config import from_dict
from star_elastic.data import synthetic
from star_elastic.hf import load_model
from star_elastic.train.parent import ParentConfig, evaluate


def test_shipped_parent_loads_like_transformers_and_solves_held_out_problems():
    import transformers

    model = load_model(PARENT)
    report = json.loads((PARENT / "train_report.json").read_text())
    assert report["params"] == model.num_parameters() and report["test"]["accuracy"] >= 0.98
    assert len(sha256(PARENT / "model.safetensors")) == 64
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(PARENT), torch_dtype=torch.float32).eval()
    ids = model.tokenizer("(3+4-2)*2=", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits.float(), atol=1e-4, rtol=1e-4)
    # 60 held-out problems (the demo's test split, seed 0), greedy, answers parsed after </think>
    examples = synthetic.make_splits(1, 0, 60, seed=0)["test"]
    cfg = from_dict(ParentConfig, {"eval_batch_size": 60, "max_new_tokens": 160})
    assert evaluate(model, model.tokenizer, examples, cfg)["accuracy"] >= 0.95
