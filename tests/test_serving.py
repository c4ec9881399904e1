"""Serving budgets from one copy of the weights; two-phase budget-controlled generation."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import randomize, tiny_config, tiny_elastic
from test_elastic_core import random_arch

from star_elastic import HybridLM
from star_elastic.elastic.arch import slice_model
from star_elastic.infer.budget import ElasticServer
from star_elastic.infer.generate import DecodeBatch, GenerationConfig, generate, prefill
from star_elastic.infer.views import SegmentedLinear, runs, view_model

THINK_END, EOS = 7, 2


def test_runs():
    assert runs(torch.tensor([0, 1, 2, 5, 6, 9])) == [(0, 3), (5, 2), (9, 1)]


@pytest.mark.parametrize("bounding_max", [0, 1 << 20], ids=["per-run matmuls", "bounding block"])
@pytest.mark.parametrize("seed", range(4))
def test_view_model_equals_sliced_model_and_shares_storage(seed, bounding_max, monkeypatch):
    monkeypatch.setattr(SegmentedLinear, "BOUNDING_MAX", bounding_max)
    cfg = tiny_config(n_groups=2 + 2 * (seed % 2), tie_word_embeddings=seed == 2)
    parent = randomize(HybridLM(cfg), seed=seed, scale=0.2).eval()
    storages = {p.untyped_storage().data_ptr() for p in parent.parameters()}
    rng = random.Random(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    for trial in range(4):
        arch = random_arch(cfg, rng, depth=trial == 3)
        view = view_model(parent, arch)
        with torch.no_grad():
            torch.testing.assert_close(view(ids), slice_model(parent, arch)(ids), atol=1e-5, rtol=0)
        for m in view.modules():
            if isinstance(m, SegmentedLinear):
                assert m.weight.untyped_storage().data_ptr() in storages
        copied = sum(p.numel() for p in view.parameters() if p.untyped_storage().data_ptr() not in storages)
        # only per-channel vectors (conv taps, gated-norm weights, per-head A/D/dt) may be copied
        assert copied <= 0.05 * parent.num_parameters()


def test_serving_every_budget_adds_almost_no_weight_memory():
    elastic = tiny_elastic()
    server = ElasticServer(elastic, THINK_END, EOS)
    storages = {p.untyped_storage().data_ptr() for p in elastic.model.parameters()}
    parent_bytes = sum(p.numel() * p.element_size() for p in elastic.model.parameters())
    extra = 0
    for b in elastic.ecfg.budgets:
        extra += sum(p.numel() * p.element_size() for p in server.model(b).parameters()
                     if p.untyped_storage().data_ptr() not in storages)
    assert server.model(0.5) is server.model(0.5)  # built once per budget
    assert (parent_bytes + extra) / parent_bytes <= 1.1


def manual_two_phase(elastic, prompt, think_b, answer_b, cap, answer_cap):
    """The same protocol written with independently sliced models and plain generate()."""
    thinker = slice_model(elastic.model, elastic.architecture(think_b))
    answerer = slice_model(elastic.model, elastic.architecture(answer_b))
    trace = generate(thinker, [prompt], GenerationConfig(max_new_tokens=cap, stop_token_ids=(THINK_END, EOS)))[0]
    if not trace or trace[-1] not in (THINK_END, EOS):
        trace = trace + [THINK_END]
    answer = generate(answerer, [prompt + trace], GenerationConfig(max_new_tokens=answer_cap, stop_token_ids=(EOS,)))[0]
    return trace, answer


@pytest.mark.parametrize("think_b,answer_b,cap,answer_cap", [
    (0.5, 1.0, 12, 6), (1.0, 0.5, 12, 6), (0.75, 0.75, 12, 6), (0.5, 0.5, 3, 6), (0.5, 0.5, 0, 4), (1.0, 1.0, 12, 0)])
def test_budget_control_equals_manual_two_phase(think_b, answer_b, cap, answer_cap):
    """Also where think == answer budget and the answer continues the trace's cache in place
    (caps 0 on either side take the prefill way): the same tokens as re-prefilling prompt + trace."""
    elastic = tiny_elastic(seed=1)
    server = ElasticServer(elastic, THINK_END, EOS)
    prompts = [[5, 9, 11, 3], [4, 4, 8], [20, 21, 22, 23, 24, 25]]
    run = server.generate(prompts, think_b, answer_b, max_think_tokens=cap, max_answer_tokens=answer_cap)
    for prompt, res in zip(prompts, run.results):
        trace, answer = manual_two_phase(elastic, prompt, think_b, answer_b, cap, answer_cap)
        assert res.think_tokens == trace
        assert res.answer_tokens == answer


@pytest.mark.parametrize("cap", [0, 3, 12])
def test_one_trace_answered_by_several_budgets_equals_separate_runs(cap):
    """The sweep thinks once per (thinker, cap) and answers that trace with every other budget
    (`ElasticServer.think` then `answer`): each answer is the one of its own two-phase run."""
    elastic = tiny_elastic(seed=2)
    server = ElasticServer(elastic, THINK_END, EOS)
    prompts = [[5, 9, 11, 3], [4, 4, 8], [20, 21, 22, 23, 24, 25]]
    thinks, forced = server.think(prompts, 0.5, cap)
    for answer_b in (1.0, 0.75):
        answers = server.answer(thinks, answer_b, 6)
        for prompt, t, f, a in zip(prompts, thinks, forced, answers):
            trace, answer = manual_two_phase(elastic, prompt, 0.5, answer_b, cap, 6)
            assert (t.tokens, a.tokens) == (trace, answer)
            assert f == (len(t.tokens) == cap + 1)  # forced: the cap's tokens, then </think>


@pytest.mark.parametrize("cap", [3, 40])  # the trace forced to close at the cap / closed by the model
def test_answer_in_place_has_the_logits_of_a_prefill_of_prompt_and_trace(cap):
    elastic = tiny_elastic(seed=3)
    server = ElasticServer(elastic, THINK_END, EOS)
    model, prompt = server.model(0.5), [5, 9, 11, 3, 8]
    think = server.think_row(prompt, cap)
    batch = DecodeBatch(model, continuation=lambda r: server.answer_in_place(r, 4)[1])
    batch.join([think])
    while think.finish is None:
        batch.step()
    answer = batch.rows[0]
    assert answer is not think and answer.prompt == prompt + think.tokens and think.tokens[-1] in (THINK_END, EOS)
    while answer.forced:
        batch.step()
    _, ref = prefill(model, [prompt + think.tokens])
    torch.testing.assert_close(batch.logits[0], ref[0], atol=1e-5, rtol=1e-5)


def test_forced_end_of_think_happens_exactly_at_the_cap():
    elastic = tiny_elastic(seed=2)
    free = generate(slice_model(elastic.model, elastic.architecture(0.5)), [[5, 6, 7]], GenerationConfig(max_new_tokens=5))[0]
    think_end = next(t for t in range(3, 97) if t not in free)  # a </think> the model does not emit within the cap
    server = ElasticServer(elastic, think_end, EOS)
    res = server.generate([[5, 6, 7]], 0.5, 1.0, max_think_tokens=5, max_answer_tokens=3).results[0]
    assert res.forced_end_of_think
    assert res.think_tokens == free + [think_end]
    assert len(res.think_tokens) == 6
