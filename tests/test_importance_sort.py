"""Importance scores on hand-made numbers, hooks against brute force, sorting preserves the function
and makes "keep a prefix" mean "keep the top-ranked"."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import randomize, tiny_config

from star_elastic import HybridLM
from star_elastic.config import ConfigError
from star_elastic.elastic.arch import Architecture, slice_state
from star_elastic.elastic.importance import (
    ImportanceStats, attention_head_scores, channel_abs_sum, collect_stats, compute_scores, depth_sum,
    expert_channel_scores, expert_scores, head_norm_sum, hidden_scores, layer_scores, load_scores,
    mamba_head_scores, mlp_channel_scores, rank_within_groups, reap_sums, save_scores, shared_channel_scores,
)
from star_elastic.elastic.sort import sort_model
from star_elastic.model.mlp import relu2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to oversubscription on a busy
    machine (with 2 threads next to another CPU-bound job this file ran 8x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int, scale: float = 0.3, **changes) -> HybridLM:
    return randomize(HybridLM(tiny_config(**changes)), seed=seed, scale=scale).eval()


# --- pure helpers on hand-made tensors -----------------------------------------------------------
def test_rank_within_groups_by_hand():
    scores = torch.tensor([1.0, 3, 2, 0, 5, 4, 6, 7])
    assert rank_within_groups(scores, 2).tolist() == [1, 2, 0, 3, 7, 6, 4, 5]
    assert rank_within_groups(scores, 1).tolist() == [7, 6, 4, 5, 1, 2, 0, 3]
    assert rank_within_groups(torch.tensor([1.0, 2, 1, 2, 0, 0]), 2).tolist() == [1, 0, 2, 3, 4, 5]  # ties: lower first
    with pytest.raises(ValueError, match="equal groups"):
        rank_within_groups(scores, 3)


def test_channel_and_head_terms_by_hand():
    x = torch.tensor([[1.0, -2, 3, 4], [0, 0, -6, 8]])  # 2 tokens, 2 heads of width 2
    assert channel_abs_sum(x).tolist() == [1, 2, 9, 12]
    heads = head_norm_sum(x, 2)  # head 0: √5 + 0, head 1: 5 + 10
    torch.testing.assert_close(heads, torch.tensor([math.sqrt(5), 15.0]))


def test_depth_term_is_one_minus_cos_of_block_input_and_output():
    x = torch.tensor([[1.0, 0], [0, 2], [1, 1]])
    h = torch.tensor([[-1.0, 1], [0, 3], [-2, -2]])  # x + h: orthogonal, parallel, opposite to x
    assert float(depth_sum(x, h)) == pytest.approx(1 + 0 + 2)
    stats = ImportanceStats("M", tokens=3, sums={"layers.0.depth": depth_sum(x, h)})
    assert layer_scores(stats).tolist() == pytest.approx([1.0])


def test_reap_sums_by_hand():
    # C = I = 2, 4 experts: e0 up=I, e1 up=2I, e2 up=[[1,1],[0,0]] down=3I, e3 never routed
    eye = torch.eye(2)
    up = torch.stack([eye, 2 * eye, torch.tensor([[1.0, 1], [0, 0]]), eye])
    down = torch.stack([eye, eye, 3 * eye, eye])
    x = torch.tensor([[1.0, 2], [-1, 3], [2, 0]])
    idx = torch.tensor([[0, 1], [1, 0], [0, 2]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.6, 0.4]])
    reap, count, inter = reap_sums(x, w, idx, up, down)
    # f_j(x) = down_j relu²(up_j x):
    #   e0: t0 [1,4] ‖√17‖, t1 [0,9] ‖9‖, t2 [4,0] ‖4‖;  e1: t0 [4,16] ‖4√17‖, t1 [0,36] ‖36‖;
    #   e2: t2 h=[4,0], f=[12,0] ‖12‖
    s17 = math.sqrt(17)
    expect = [0.75 * s17 + 0.5 * 9 + 0.6 * 4, 0.25 * 4 * s17 + 0.5 * 36, 0.4 * 12, 0]  # Σ g·‖f‖ per expert
    torch.testing.assert_close(reap, torch.tensor(expect))
    assert count.tolist() == [3, 2, 1, 0]
    assert inter.tolist() == [[5, 13], [4, 52], [4, 0], [0, 0]]
    stats = ImportanceStats("E", tokens=3, sums={"layers.0.reap": reap, "layers.0.routed": count,
                                                  "layers.0.expert_inter": inter})
    torch.testing.assert_close(expert_scores(stats), torch.tensor([(0.75 * s17 + 6.9) / 3, (s17 + 18) / 2, 4.8, 0]))
    torch.testing.assert_close(expert_channel_scores(stats), torch.tensor([[5 / 3, 13 / 3], [2, 26], [4, 0], [0, 0]]))


def test_scores_are_means_per_layer_and_sums_over_layers():
    t = torch.tensor
    sums = {
        "norm.0": t([4.0, 8]), "norm.1": t([0.0, 4]), "norm.2": t([4.0, 0]), "norm.3": t([0.0, 0]),
        "norm_f": t([2.0, 2]),
        "layers.0.attn_heads": t([4.0, 0, 8]), "layers.2.attn_heads": t([0.0, 4, 4]),
        "layers.1.reap": t([2.0, 6]), "layers.1.routed": t([1.0, 3]), "layers.1.expert_inter": t([[1.0], [6]]),
        "layers.1.shared_inter": t([8.0]), "layers.3.mamba_heads": t([2.0, 2]),
        **{f"layers.{i}.depth": t(float(i)) for i in range(4)},
    }
    stats = ImportanceStats("*E*M", tokens=4, sums=sums)
    assert hidden_scores(stats).tolist() == [2.5, 3.5]  # (4+0+4+0+2)/4, (8+4+0+0+2)/4
    assert attention_head_scores(stats, 0).tolist() == [1, 0, 2]
    assert attention_head_scores(stats).tolist() == [1, 1, 3]  # one ranking: sum over attention layers
    assert expert_scores(stats, 1).tolist() == [2, 2]  # REAP divides by routed tokens, not all tokens
    assert expert_channel_scores(stats, 1).tolist() == [[1], [2]]
    assert shared_channel_scores(stats, 1).tolist() == [2]
    assert mamba_head_scores(stats).tolist() == [0.5, 0.5]
    assert layer_scores(stats).tolist() == [0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="no mlp layer"):
        mlp_channel_scores(stats)
    with pytest.raises(ValueError, match="layer 1 is a moe layer"):
        attention_head_scores(stats, 1)
    scores = compute_scores(stats)
    assert sorted(scores) == sorted(["hidden", "depth", "layers.0.attn_heads", "layers.1.experts",
                                     "layers.1.expert_inter", "layers.1.shared_inter", "layers.2.attn_heads",
                                     "layers.3.mamba_heads"])
    assert scores["layers.2.attn_heads"].tolist() == [0, 1, 1]  # per layer: its own scores


# --- collection ---------------------------------------------------------------------------------
def _capture_inputs(model, names):
    """Record the first input of named modules with the test's own hooks."""
    seen, handles = {}, []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0])))
    return seen, handles


def test_collect_stats_shapes_and_brute_force():
    model = tiny_model(3, routed_scaling_factor=2.5, num_experts_per_tok=3)
    cfg = model.config
    batches = [torch.randint(3, cfg.vocab_size, (2, 9)), torch.randint(3, cfg.vocab_size, (3, 5))]
    stats = collect_stats(model, batches)
    assert stats.tokens == 2 * 9 + 3 * 5
    assert not model._forward_hooks and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    scores = compute_scores(stats)
    shapes = {"attn_heads": (6,), "mamba_heads": (8,), "mlp_inter": (40,), "shared_inter": (20,), "experts": (8,),
              "expert_inter": (8, 12)}
    for key, value in scores.items():
        assert torch.isfinite(value).all(), key
        if key.startswith("layers."):
            assert tuple(value.shape) == shapes[key.split(".")[2]], key
    assert scores["hidden"].shape == (48,) and scores["depth"].shape == (8,)
    assert {int(k.split(".")[1]) for k in scores if k.startswith("layers.")} == set(range(cfg.num_layers))

    # brute force, token by token, from inputs recorded by independent hooks
    moe, attn, i_moe, i_attn = "backbone.layers.2.mixer", "backbone.layers.1.mixer.o_proj", 2, 1
    seen, handles = _capture_inputs(model, [moe, attn, "backbone.layers.4"])
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    mixer = model.get_submodule(moe)
    E = cfg.n_routed_experts
    total, n_routed, inter = torch.zeros(E), torch.zeros(E), torch.zeros(E, 12)
    with torch.no_grad():
        for x in torch.cat([t.reshape(-1, 48) for t in seen[moe]]):
            s = torch.sigmoid(mixer.gate.weight @ x)  # (E,)
            chosen = torch.topk(s + mixer.gate.e_score_correction_bias, 3).indices
            g = s[chosen] / s[chosen].sum() * 2.5  # bias selects only; gate normalised and scaled
            for e, ge in zip(chosen.tolist(), g):
                h = relu2(mixer.experts.up_proj[e] @ x)
                total[e] += ge * (mixer.experts.down_proj[e] @ h).norm()
                n_routed[e] += 1
                inter[e] += h.abs()
    expect = torch.where(n_routed > 0, total / n_routed.clamp_min(1), 0)
    torch.testing.assert_close(scores[f"layers.{i_moe}.experts"], expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores[f"layers.{i_moe}.expert_inter"], inter / n_routed.clamp_min(1)[:, None],
                               rtol=1e-5, atol=1e-6)
    heads = torch.cat([t.reshape(-1, 6, 8) for t in seen[attn]]).norm(dim=-1).mean(0)
    torch.testing.assert_close(scores[f"layers.{i_attn}.attn_heads"], heads, rtol=1e-5, atol=1e-6)
    x = torch.cat([t.reshape(-1, 48) for t in seen["backbone.layers.4"]])  # block 4 input
    with torch.no_grad():
        y = x + model.backbone.layers[4].mixer(model.backbone.layers[4].norm(x))
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    assert float(scores["depth"][4]) == pytest.approx(float((1 - cos).mean()), rel=1e-4)


def test_collect_excludes_padding():
    model = tiny_model(5)
    ids = torch.randint(3, 97, (2, 9))
    right = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)  # pad id 0 at the end
    left = torch.cat([torch.full((2, 3), 50), ids], 1)
    left_mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 9)], 1)
    plain = compute_scores(collect_stats(model, [ids]))
    for stats in (collect_stats(model, [right]), collect_stats(model, [left], attention_mask=[left_mask])):
        assert stats.tokens == 18
        for key, value in compute_scores(stats).items():
            torch.testing.assert_close(value, plain[key], atol=1e-5, rtol=1e-5, msg=key)


def test_hooks_removed_and_mode_restored_on_error():
    model = tiny_model(6).train()
    with pytest.raises(ValueError, match="attention_mask shape"):
        collect_stats(model, [torch.ones(2, 5, dtype=torch.long)], attention_mask=[torch.ones(2, 4)])
    assert model.training
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# --- sorting ------------------------------------------------------------------------------------
SORT_CONFIGS = [
    {},
    dict(n_groups=4, mamba_num_heads=8),  # 4 SSM groups of 2 heads
    dict(num_attention_heads=6, num_key_value_heads=3, mamba_proj_bias=True, mlp_bias=True),  # GQA 3 groups, biases
    dict(num_attention_heads=4, num_key_value_heads=1, num_experts_per_tok=4, pattern="E*M-EM"),  # MQA, top-4
    dict(tie_word_embeddings=True, num_experts_per_tok=5, n_routed_experts=6),  # tied head, top-5
]


@pytest.mark.parametrize("changes", SORT_CONFIGS)
def test_sorted_model_equals_original(changes):
    model = tiny_model(7, scale=0.2, **changes)
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (2, 11))
    ranked = sort_model(model, compute_scores(collect_stats(model, [ids])))
    assert ranked is not model and ranked.config == cfg
    with torch.no_grad():
        torch.testing.assert_close(ranked(ids), model(ids), atol=1e-5, rtol=1e-5)
        mask = torch.ones_like(ids).index_fill_(1, torch.tensor([0, 1]), 0)  # left padding
        torch.testing.assert_close(ranked(ids, attention_mask=mask), model(ids, attention_mask=mask),
                                   atol=1e-5, rtol=1e-5)
    if cfg.tie_word_embeddings:
        assert ranked.lm_head.weight is ranked.backbone.embeddings.weight
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, ranked.state_dict()[k])]
    assert changed  # a real permutation happened


def test_prefix_after_sorting_keeps_the_top_ranked():
    model = tiny_model(8)
    cfg = model.config  # M*EM-E*M: 6 heads in 2 KV groups, 8 Mamba heads in 2 SSM groups, 8 experts
    g = torch.Generator().manual_seed(1)
    scores = {
        "hidden": torch.randperm(48, generator=g).float(),
        "layers.0.mamba_heads": torch.randperm(8, generator=g).float(),
        "layers.1.attn_heads": torch.randperm(6, generator=g).float(),
        "layers.2.experts": torch.randperm(8, generator=g).float(),
        "layers.2.expert_inter": torch.rand(8, 12, generator=g),
        "layers.4.mlp_inter": torch.randperm(40, generator=g).float(),
    }
    ranked = sort_model(model, scores)
    old, new = model.backbone.layers, ranked.backbone.layers
    hid = scores["hidden"].argsort(descending=True)
    best = int(scores["layers.2.experts"].argmax())
    best_inter = scores["layers.2.expert_inter"][best].argsort(descending=True)
    assert torch.equal(new[2].mixer.experts.up_proj[0], old[2].mixer.experts.up_proj[best][best_inter][:, hid])
    assert torch.equal(new[2].mixer.gate.e_score_correction_bias[0], old[2].mixer.gate.e_score_correction_bias[best])

    # a smaller nested architecture keeps exactly the top-scored components, per group for heads
    arch = dataclasses.replace(Architecture.full(cfg), hidden=32, attn_heads=2, mamba_heads=3, experts=3,
                               expert_inter=5, mlp_inter=16)
    small = slice_state(ranked.state_dict(), cfg, arch)
    keep_h = hid[:32]

    def top_per_group(s, groups, k):
        per = s.numel() // groups
        return (s.view(groups, per).topk(k, dim=1).indices + torch.arange(groups)[:, None] * per).reshape(-1)

    q_heads = top_per_group(scores["layers.1.attn_heads"], 2, 2)  # 2 of 3 per KV group
    q_old = old[1].mixer.q_proj.weight.view(6, 8, 48)
    assert torch.equal(small["backbone.layers.1.mixer.q_proj.weight"].view(4, 8, 32), q_old[q_heads][:, :, keep_h])
    m_heads = top_per_group(scores["layers.0.mamba_heads"], 2, 3)  # 3 of 4 per SSM group
    assert torch.equal(small["backbone.layers.0.mixer.A_log"], old[0].mixer.A_log[m_heads])
    out_old = old[0].mixer.out_proj.weight.view(48, 8, 6)
    assert torch.equal(small["backbone.layers.0.mixer.out_proj.weight"].view(32, 6, 6), out_old[keep_h][:, m_heads])
    experts = scores["layers.2.experts"].topk(3).indices
    inter = scores["layers.2.expert_inter"][experts].topk(5, dim=1).indices  # (3, 5): each expert's own best
    up_old = old[2].mixer.experts.up_proj[experts]
    expect = torch.stack([up_old[r][inter[r]][:, keep_h] for r in range(3)])
    assert torch.equal(small["backbone.layers.2.mixer.experts.up_proj"], expect)
    mlp = scores["layers.4.mlp_inter"].topk(16).indices
    assert torch.equal(small["backbone.layers.4.mixer.down_proj.weight"], old[4].mixer.down_proj.weight[keep_h][:, mlp])
    assert torch.equal(small["backbone.embeddings.weight"], model.backbone.embeddings.weight[:, keep_h])
    # layer 5 (MoE) had no scores: experts keep their order
    assert torch.equal(new[5].mixer.experts.up_proj, old[5].mixer.experts.up_proj[:, :, hid])


def test_sort_rejects_scores_of_another_model():
    model = tiny_model(9)
    with pytest.raises(ConfigError, match="'layers.2.experts' has shape"):
        sort_model(model, {"layers.2.experts": torch.rand(5)})
    with pytest.raises(ConfigError, match="'layers.0.experts' does not exist"):
        sort_model(model, {"layers.0.experts": torch.rand(8)})


# --- storage ------------------------------------------------------------------------------------
def test_scores_round_trip_bit_exact_and_bad_files(tmp_path):
    model = tiny_model(10)
    scores = compute_scores(collect_stats(model, [torch.randint(3, 97, (2, 6))]))
    save_scores(scores, tmp_path / "s.safetensors")
    back = load_scores(tmp_path / "s.safetensors")
    assert back.keys() == scores.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in scores.items())
    with pytest.raises(ConfigError, match="missing.safetensors: cannot read importance scores"):
        load_scores(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00nope")
    with pytest.raises(ConfigError, match="bad.safetensors: cannot read importance scores"):
        load_scores(tmp_path / "bad.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"no")
    with pytest.raises(ConfigError, match="short.safetensors"):
        load_scores(tmp_path / "short.safetensors")
