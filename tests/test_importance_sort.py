"""Importance scores on hand-made inputs, REAP against brute force, sorting preserves the function."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import randomize, tiny_config

from star_elastic import HybridLM
from star_elastic.config import ConfigError
from star_elastic.elastic.arch import Architecture, IndexSets
from star_elastic.elastic.importance import (
    ImportanceStats, collect_stats, compute_scores, layer_score, load_scores, rank_within_groups, reap_scores,
    save_scores,
)
from star_elastic.elastic.sort import sort_model
from star_elastic.model.mlp import relu2


def test_rank_within_groups_by_hand():
    scores = torch.tensor([1.0, 3, 2, 0, 5, 4, 6, 7])
    assert rank_within_groups(scores, 2).tolist() == [1, 2, 0, 3, 7, 6, 4, 5]
    assert rank_within_groups(torch.tensor([1.0, 1, 2]), 1).tolist() == [2, 0, 1]  # ties: lower index first


def test_reap_and_layer_score_by_hand():
    assert reap_scores(torch.tensor([3.0, 0, 8]), torch.tensor([2.0, 0, 4])).tolist() == [1.5, 0, 2]
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 5.0]])  # orthogonal (1 − 0) and parallel (1 − 1)
    assert float(layer_score(x, y)) == pytest.approx(0.5)


def test_compute_scores_hidden_is_mean_abs_summed_over_norms():
    stats = ImportanceStats({"tokens": torch.tensor([4.0]), "hidden.layers.0": torch.tensor([4.0, 8.0]),
                             "hidden.final": torch.tensor([0.0, 4.0]), "layers.0.depth": torch.tensor([2.0])})
    s = compute_scores(stats)
    assert s["hidden"].tolist() == [1.0, 3.0] and s["depth"].tolist() == [0.5]


def test_collected_reap_equals_brute_force():
    cfg = tiny_config(pattern="E", num_experts_per_tok=3)
    model = randomize(HybridLM(cfg), seed=4).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 7))
    stats = collect_stats(model, [ids])
    moe = model.backbone.layers[0].mixer
    with torch.no_grad():
        x = model.backbone.layers[0].norm(model.backbone.embeddings(ids)).reshape(-1, cfg.hidden_size)
        w, idx = moe.gate(x)
        expect_sum, expect_n = torch.zeros(cfg.n_routed_experts), torch.zeros(cfg.n_routed_experts)
        for t in range(x.shape[0]):  # token by token, slot by slot
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                f = relu2(x[t] @ moe.experts.up_proj[e].t()) @ moe.experts.down_proj[e].t()
                expect_sum[e] += w[t, j] * f.norm()
                expect_n[e] += 1
    torch.testing.assert_close(compute_scores(stats)["layers.0.experts"], reap_scores(expect_sum, expect_n))


def test_collect_excludes_padding_and_covers_every_layer():
    cfg = tiny_config()
    model = randomize(HybridLM(cfg), seed=5).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 9))
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)  # pad id 0 at the end
    a, b = compute_scores(collect_stats(model, [ids])), compute_scores(collect_stats(model, [padded]))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    kinds = {k.split(".")[-1] for k in a if k.startswith("layers.")}
    assert kinds == {"attn_heads", "mamba_heads", "mlp_inter", "shared_inter", "experts", "expert_inter"}
    assert a["depth"].shape == (cfg.num_layers,)


@pytest.mark.parametrize("changes", [{}, dict(n_groups=4), dict(num_key_value_heads=3, num_attention_heads=6),
                                     dict(tie_word_embeddings=True, num_experts_per_tok=4)])
def test_sorted_model_equals_original(changes):
    cfg = tiny_config(**changes)
    model = randomize(HybridLM(cfg), seed=6, scale=0.2).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 11))
    scores = compute_scores(collect_stats(model, [ids]))
    ranked = sort_model(model, scores)
    with torch.no_grad():
        torch.testing.assert_close(ranked(ids), model(ids), atol=1e-5, rtol=0)
    if cfg.tie_word_embeddings:
        assert ranked.lm_head.weight is ranked.backbone.embeddings.weight


def test_prefix_after_sorting_keeps_the_top_ranked():
    cfg = tiny_config()
    model = randomize(HybridLM(cfg), seed=7).eval()
    g = torch.Generator().manual_seed(0)
    scores = {"hidden": torch.rand(cfg.hidden_size, generator=g), "depth": torch.zeros(cfg.num_layers),
              "layers.2.experts": torch.rand(cfg.n_routed_experts, generator=g),
              "layers.1.attn_heads": torch.rand(cfg.num_attention_heads, generator=g)}
    ranked = sort_model(model, scores)
    best = int(scores["layers.2.experts"].argmax())
    assert torch.equal(ranked.backbone.layers[2].mixer.experts.up_proj[0],
                       model.backbone.layers[2].mixer.experts.up_proj[best][:, scores["hidden"].argsort(descending=True)])
    # keeping 2 heads per KV group keeps each group's two best heads
    arch = dataclasses.replace(Architecture.full(cfg), attn_heads=2)
    kept = IndexSets.prefix(cfg, arch).q_heads
    per_group = scores["layers.1.attn_heads"].view(2, 3)
    top2 = per_group.argsort(dim=1, descending=True)[:, :2] + torch.tensor([[0], [3]])
    q_old = model.backbone.layers[1].mixer.q_proj.weight.view(6, 8, -1)
    q_new = ranked.backbone.layers[1].mixer.q_proj.weight.view(6, 8, -1)
    hid = scores["hidden"].argsort(descending=True)
    assert torch.equal(q_new[kept], q_old[top2.reshape(-1)][:, :, hid])


def test_scores_round_trip_and_bad_file(tmp_path):
    scores = {"hidden": torch.rand(5), "layers.0.expert_inter": torch.rand(4, 3)}
    save_scores(scores, tmp_path / "s.safetensors")
    back = load_scores(tmp_path / "s.safetensors")
    assert all(torch.equal(back[k], v) for k, v in scores.items())
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="bad.safetensors: cannot read importance scores"):
        load_scores(tmp_path / "bad.safetensors")
