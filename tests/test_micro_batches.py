"""Gradient accumulation over micro-batches (`micro_batch_size`) equals one forward of the whole
batch: for the parent's trainer (length-sorted, gradients) and for elastify (packed rows, trained
weights, SGD, under budget_sampling step and all); the multi-process versions (DDP with `no_sync`,
FSDP2 reduce-scattering each micro-batch) are in test_distributed.py."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_elastify import TINY_PARENT, config, save_tiny_parent

from star_elastic import HybridLM, ModelConfig
from star_elastic.config import ConfigError
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.elastic.run import load_elastic
from star_elastic.train.elastify import train
from star_elastic.train.parent import ParentConfig, accumulate_lm, length_groups, lm_loss, make_batch


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    return save_tiny_parent(tmp_path_factory.mktemp("parent"))


def test_length_groups_sort_by_length_and_cut_equal_groups():
    assert length_groups([5, 2, 9, 2, 7, 1], 2) == [[5, 1], [3, 0], [4, 2]]  # ties keep row order
    assert length_groups([5, 2, 9], None) == [[0, 1, 2]]
    assert length_groups([5, 2, 9], 3) == [[0, 1, 2]]
    with pytest.raises(ConfigError, match="micro_batch_size 2 must divide the 3 rows"):
        length_groups([5, 2, 9], 2)
    with pytest.raises(ConfigError, match="micro_batch_size must be a positive divisor of batch_size 48"):
        ParentConfig(micro_batch_size=5)


def test_parent_micro_batches_give_the_whole_batch_gradient_with_less_padding():
    tok = build_tokenizer()
    model = HybridLM(ModelConfig(**TINY_PARENT, vocab_size=len(tok))).init_weights(0)
    rng = random.Random(0)
    picked = []
    for _ in range(8):  # problems of very different lengths, loss on a tail of each
        n = rng.randrange(6, 40)
        ids = [rng.randrange(3, len(tok)) for _ in range(n)]
        picked.append((ids, [0] * (n // 2) + [1] * (n - n // 2)))

    def grads(rows):
        model.zero_grad(set_to_none=True)
        loss = accumulate_lm(model, picked, rows, pad_id=0)
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole_loss, whole = grads(None)
    with torch.no_grad():
        assert whole_loss == pytest.approx(float(lm_loss(model, *make_batch(picked, 0))), abs=1e-6)
    for rows in (1, 2, 4):
        loss, split = grads(rows)
        assert loss == pytest.approx(whole_loss, abs=1e-5)
        assert split.keys() == whole.keys()
        for name in whole:
            torch.testing.assert_close(split[name], whole[name], atol=2e-6, rtol=1e-4, msg=name)
    groups = length_groups([len(ids) for ids, _ in picked], 2)
    padded = sum(len(g) * max(len(picked[i][0]) for i in g) for g in groups)
    assert padded < len(picked) * max(len(ids) for ids, _ in picked)


@pytest.mark.parametrize("sampling", ["step", "all"])
def test_elastify_micro_batches_train_the_same_weights(parent_dir, tmp_path, sampling):
    """SGD (Adam would amplify ~1e-8 summation-order differences), 4 steps over both stages, 4
    packed rows per step in 1 and in 4 forwards (all: each budget in each): the same weights and
    router, the same losses. (micro_batch draws a budget per micro-batch: a different step.)"""
    base = dict(steps=4, optimizer="sgd", lr=0.5, router_lr=0.5, warmup_steps=1, lm_weight=0.5, settle_every=0,
                budget_sampling=sampling, elastic={"budget_mode": "none"})  # the router loss acts at every step
    runs = {}
    for rows in (None, 1):
        out = tmp_path / f"micro-{rows}"
        train(config(parent_dir, out, engine={"micro_batch_size": rows}, **base), log=lambda m: None)
        elastic = load_elastic(out)
        runs[rows] = (elastic.model.state_dict() | {f"router.{k}": v for k, v in elastic.router.state_dict().items()},
                      [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    (whole, whole_metrics), (weights, metrics) = runs[None], runs[1]
    assert max(float((weights[k] - whole[k]).abs().max()) for k in whole) < 1e-5
    assert len(metrics) == len(whole_metrics) == 4
    for a, b in zip(metrics, whole_metrics):
        assert a.get("arch") == b.get("arch") and a["budgets"][0] == b["budgets"][0]
        assert a["kd"] == pytest.approx(b["kd"], abs=1e-6) and a["lm"] == pytest.approx(b["lm"], abs=1e-6)
        assert a["objective"] == pytest.approx(b["objective"], abs=1e-6)
    with pytest.raises(ConfigError, match="micro_batch_size 3 must divide each process's 4 sequences"):
        train(config(parent_dir, tmp_path / "bad", engine={"micro_batch_size": 3}), log=lambda m: None)
