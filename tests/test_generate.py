"""Cached decoding against uncached recomputation; the recurrent step against the chunked scan."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny_config

from star_elastic import HybridLM
from star_elastic.infer.generate import GenerationConfig, generate, sample_next
from star_elastic.model.mamba2 import MambaState, _decay_matrix, ssd_chunked, ssd_step


def model(seed=0, **changes):
    return randomize(HybridLM(tiny_config(**changes)), seed=seed, scale=0.5).eval()


@torch.no_grad()
def greedy_uncached(m, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_batched_cached_greedy_equals_uncached_per_prompt():
    m = model(chunk_size=5)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24]]
    outs = generate(m, prompts, GenerationConfig(max_new_tokens=20))
    for prompt, out in zip(prompts, outs):
        assert out == greedy_uncached(m, prompt, 20)


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
@pytest.mark.parametrize("length", [1, 5, 13])
def test_chunked_scan_equals_step_recurrence(chunk, length):
    g = torch.Generator().manual_seed(length * 31 + chunk)
    b, H, P, G, N = 2, 6, 3, 3, 5
    x = torch.randn(b, length, H, P, generator=g)
    dt = torch.rand(b, length, H, generator=g) * 0.5
    A = -torch.rand(H, generator=g) * 3
    Bm, Cm = torch.randn(b, length, G, N, generator=g), torch.randn(b, length, G, N, generator=g)
    init = torch.randn(b, H, P, N, generator=g)
    y, final = ssd_chunked(x, dt, A, Bm, Cm, chunk, init.clone())
    state, ys = init.clone(), []
    for t in range(length):
        ys.append(ssd_step(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t]))
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final, atol=1e-5, rtol=1e-5)


def recurrence_f64(x, dt, A, Bm, Cm, init):
    """The SSM as written in the Mamba-2 paper, one step at a time in float64 with plain exp:
    h = exp(dt·A) h + dt·x ⊗ B, y = h·C (B and C shared by the heads of a group)."""
    b, T, H, P = x.shape
    R = H // Bm.shape[2]
    h, ys = init.double(), []
    for t in range(T):
        Bh = Bm[:, t].double().repeat_interleave(R, 1)[:, :, None, :]  # (b, H, 1, N)
        Ch = Cm[:, t].double().repeat_interleave(R, 1)[:, :, None, :]
        decay = torch.exp(dt[:, t].double() * A.double())[..., None, None]
        h = decay * h + (dt[:, t].double()[..., None] * x[:, t].double())[..., None] * Bh
        ys.append((h * Ch).sum(-1))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("chunk", [4, 16])
def test_scan_with_underflowing_decays_matches_float64_recurrence(chunk):
    """Decays far below fp32's smallest normal (dt·A down to -200 per step, cumulated over the
    chunk): the scan floors exp's argument (mamba2.LOG_TINY, a CPU speed matter) and must still
    give the plain-exp float64 recurrence's outputs, states and gradients."""
    g = torch.Generator().manual_seed(chunk)
    b, T, H, P, G, N = 2, 21, 4, 3, 2, 5
    x = torch.randn(b, T, H, P, generator=g, requires_grad=True)
    dt = (torch.rand(b, T, H, generator=g) * 10).requires_grad_()
    A = (-torch.tensor([0.05, 1.0, 8.0, 20.0])).requires_grad_()  # per head: from slow to ~exp(-200) a step
    Bm = torch.randn(b, T, G, N, generator=g, requires_grad=True)
    Cm = torch.randn(b, T, G, N, generator=g, requires_grad=True)
    init = torch.randn(b, H, P, N, generator=g)
    y, final = ssd_chunked(x, dt, A, Bm, Cm, chunk, init.clone())
    y_ref, final_ref = recurrence_f64(x, dt, A, Bm, Cm, init)
    a_cum = torch.cumsum(dt.detach() * A.detach(), 1)
    assert (a_cum < -500).any(), "the case must reach decays that underflow fp32"
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final.double(), final_ref, atol=1e-4, rtol=1e-4)
    weights = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * weights).sum() + final.sum(), (x, dt, A, Bm, Cm))
    grads_ref = torch.autograd.grad((y_ref * weights.double()).sum() + final_ref.sum(), (x, dt, A, Bm, Cm))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-3, rtol=1e-4)
    state = init.clone()
    steps = [ssd_step(state, x[:, t].detach(), dt[:, t].detach(), A.detach(), Bm[:, t].detach(), Cm[:, t].detach())
             for t in range(T)]
    torch.testing.assert_close(torch.stack(steps, 1).double(), y_ref.detach(), atol=1e-4, rtol=1e-4)


def test_decay_matrix_keeps_only_its_output_for_backward():
    """The floor (a clamp) must not add a saved (..., L, L) tensor to the training graph: the
    decay matrix keeps for its backward what exp would, its output, and nothing else that size."""
    g = torch.Generator().manual_seed(0)
    a_cum = torch.cumsum(-torch.rand(3, 2, 16, generator=g) * 20, -1).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        w = _decay_matrix(a_cum)
    big = [t for t in saved if t.numel() >= w.numel()]
    assert len(big) == 1 and big[0].data_ptr() == w.data_ptr()
    grad = torch.randn(w.shape, generator=g)
    (got,) = torch.autograd.grad(w, a_cum, grad)
    diff = a_cum.double().unsqueeze(-1) - a_cum.double().unsqueeze(-2)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    (want,) = torch.autograd.grad(torch.exp(diff.masked_fill(~causal, float("-inf"))), a_cum, grad.double())
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_mamba_state_owns_only_its_own_memory():
    """After a prefill, a Mamba layer's cached conv window and SSM state are (B, K-1, C) and
    (B, H, P, N) in memory too, not views that keep the prompt's whole conv input (B, K-1+T, C)
    or every chunk's state (B, T/chunk+1, H, P, N) alive: at Nemotron-3-Nano's sizes a view of an
    8K-token prompt would hold hundreds of MB per row and layer. Decoding afterwards still matches
    recomputation (the tests above)."""
    m = model(chunk_size=4)
    ids = torch.randint(0, 97, (2, 61))
    cache = m.new_cache()
    m(ids, cache=cache)
    states = [s for s in cache.layers if isinstance(s, MambaState)]
    assert states
    for s in states:
        for t in (s.conv, s.ssm):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    m(ids[:, :1], cache=cache)  # one decode step keeps it so
    for s in states:
        for t in (s.conv, s.ssm):
            assert t.untyped_storage().nbytes() <= 2 * t.numel() * t.element_size()


@torch.no_grad()
def test_prefill_in_pieces_equals_one_pass():
    m = model()
    ids = torch.randint(0, 97, (2, 17))
    full = m(ids)
    cache = m.new_cache()
    parts = [m(ids[:, :6], cache=cache), m(ids[:, 6:7], cache=cache), m(ids[:, 7:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_left_padding_changes_nothing_for_real_tokens():
    m = model()
    short = torch.randint(3, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    torch.testing.assert_close(m(padded, attention_mask=mask)[:, 4:], m(short), atol=1e-5, rtol=0)


def test_stop_tokens_and_strings():
    m = model()
    prompt = [5, 6, 7]
    free = generate(m, [prompt], GenerationConfig(max_new_tokens=12))[0]
    stop = free[4]
    cut = generate(m, [prompt], GenerationConfig(max_new_tokens=12, stop_token_ids=(stop,)))[0]
    assert cut == free[: free.index(stop) + 1]

    class CharTok:  # decode token ids as letters: the stop string "ab" means ids 0 then 1
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    text = CharTok().decode(free)
    target = text[5:7]
    cut = generate(m, [prompt], GenerationConfig(max_new_tokens=12, stop_strings=(target,)), tokenizer=CharTok())[0]
    assert cut == free[: text.index(target) + 2]


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    m = model()
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert generate(m, [[4, 5]], cfg) == generate(m, [[4, 5]], cfg)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = {int(sample_next(logits, GenerationConfig(temperature=1.0, top_p=0.7), None)) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    tiny = GenerationConfig(temperature=1.0, top_p=5e-324)  # 0 in float32 (a fuzzer's find): the top token only
    assert {int(sample_next(logits, tiny, None)) for _ in range(20)} == {0}


def test_bad_generation_config_messages():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(model(), [[1, 2]], GenerationConfig(stop_strings=("x",)))


def test_rows_joining_and_leaving_a_running_batch_decode_as_if_alone():
    """Continuous batching: prompts join at different steps (caches stacked, left-padded in time)
    and finished rows leave (cache rows selected, dead padding trimmed); each row == generate alone."""
    from star_elastic.infer.generate import DecodeBatch, Row

    m = model(seed=1, chunk_size=4)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13], [20, 21, 22, 23, 24], [30], [40, 41, 42]]
    caps = [14, 3, 9, 12, 6]
    rows = [Row(p, GenerationConfig(max_new_tokens=n)) for p, n in zip(prompts, caps)]
    batch = DecodeBatch(m)
    joins = {0: rows[:2], 2: rows[2:4], 5: rows[4:]}  # step -> rows joining before it
    for step in range(20):
        if step in joins:
            batch.join(joins[step])
        if batch.rows:
            batch.step()
    for p, n, r in zip(prompts, caps, rows):
        assert r.tokens == greedy_uncached(m, p, n)
        assert r.finish == "length"


def test_rows_asking_for_logprobs_get_a_plain_forwards_and_the_others_are_untouched():
    """Scored rows (prompt log-probabilities, top K per sampled token) batched with plain rows: their
    values equal log_softmax of one uncached forward over prompt + output (fp32, 1e-5); the plain rows'
    tokens equal their uncached greedy decode. With isolate_rows, a row whose sampling raises ends with
    its error and the others go on."""
    from star_elastic.infer.generate import DecodeBatch, Row

    m = model(seed=2, chunk_size=4)
    prompts = [[3, 4, 5, 6, 7, 8], [12, 13], [20, 21, 22, 23, 24], [30, 31, 32]]
    rows = [Row(prompts[0], GenerationConfig(max_new_tokens=7, logprobs=3), score_prompt=6),
            Row(prompts[1], GenerationConfig(max_new_tokens=9)),
            Row(prompts[2], GenerationConfig(max_new_tokens=0, logprobs=0), score_prompt=4),  # scored only
            Row(prompts[3], GenerationConfig(max_new_tokens=5, temperature=1.0, seed=1, logprobs=2),
                generator=torch.Generator().manual_seed(1))]
    batch = DecodeBatch(m)
    batch.join(rows)
    while batch.rows:
        batch.step()
    assert rows[1].tokens == greedy_uncached(m, prompts[1], 9)
    for r in (rows[0], rows[2], rows[3]):
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([r.prompt + r.tokens]))[0].float(), -1)
        n = len(r.prompt)
        for pos, got in enumerate(r.token_logprobs):  # token pos of the output, predicted at n + pos - 1
            row = lp[n + pos - 1]
            assert got.logprob == pytest.approx(float(row[r.tokens[pos]]), abs=1e-5)
            assert [t for t, _ in got.top] == row.topk(r.cfg.logprobs).indices.tolist()
        assert len(r.token_logprobs) == len(r.tokens)
        if r.score_prompt:
            assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == r.score_prompt
            want = [float(lp[i - 1, r.prompt[i]]) for i in range(1, r.score_prompt)]
            assert [s.logprob for s in r.prompt_logprobs[1:]] == pytest.approx(want, abs=1e-5)
    assert rows[2].tokens == [] and rows[2].finish == "length"


def test_an_isolated_row_failure_ends_that_row_only(monkeypatch):
    from star_elastic.infer import generate as generate_module
    from star_elastic.infer.generate import DecodeBatch, Row

    m = model(seed=3)
    real = generate_module.sample_next

    def sample_next(logits, cfg, generator):
        if cfg.seed == 99:
            raise RuntimeError("this row's sampling fails")
        return real(logits, cfg, generator)

    monkeypatch.setattr(generate_module, "sample_next", sample_next)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    bad = Row(prompts[1], GenerationConfig(max_new_tokens=6, temperature=1.0, seed=99))
    rows = [Row(prompts[0], GenerationConfig(max_new_tokens=6)), bad,
            Row(prompts[2], GenerationConfig(max_new_tokens=6))]
    with pytest.raises(RuntimeError, match="sampling fails"):  # generate's batches raise
        batch = DecodeBatch(m)
        batch.join(rows)
        batch.step()
    rows = [Row(p, r.cfg) for p, r in zip(prompts, rows)]
    batch = DecodeBatch(m, isolate_rows=True)
    batch.join(rows)
    finished = batch.step()
    assert finished == [rows[1]] and rows[1].finish == "error" and "sampling fails" in str(rows[1].error)
    while batch.rows:
        batch.step()
    for r in (rows[0], rows[2]):
        assert r.tokens == greedy_uncached(m, r.prompt, 6)
