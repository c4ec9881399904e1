"""Packed rows (several documents back to back, `seq_idx`) against each document run alone.

The model (parent with every block kind, elastic masked model, activation checkpointing, the
distillation step, 2-process FSDP2) run once over packed rows must give each document's outputs
and, for a loss over the packed rows, the gradients of the sum of the documents' own losses.
chunk_size is 4, so documents of 1, 2, 3, 4, 5 and 11 tokens start mid-chunk, end mid-chunk and
span chunks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize, tiny_config, tiny_elastic
from safetensors.torch import load_file
from test_generate import recurrence_f64

from star_elastic import HybridLM
from star_elastic.distributed import EngineConfig, parallelize
from star_elastic.model.mamba2 import ssd_chunked
from star_elastic.train.distill import DistillStep

ROWS = [[3, 1, 5, 2, 11, 4, 3], [29], [5, 11, 1, 4, 2, 3, 3]]  # document lengths per row, 29 tokens each
ATOL = 1e-5  # fp32 outputs
SUM_RTOL = 1e-6  # fp32 loss sums over all tokens (~200 here)
# fp32 gradients (sums over all tokens, up to ~200 here): max |diff| within 1e-5 of the tensor's max |gradient|,
# or within 1e-5 where that is below 1 (some are 0 but for rounding: the router's on axes whose choices differ
# only in parts that are never used, such as never-routed experts)
GRAD_RTOL = 1e-5
# Gumbel temperature: the fitted router's softmax is saturated (probabilities 1 - 1e-9) at 1.0, and its
# gradients there are fp32 cancellation noise; at 20 the same picks (the argmax) have real gradients.
TAU = 20.0


def packed_batch(rows: list[list[int]], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, T) and seq_idx (B, T): document d of a row covers its d-th length."""
    g = torch.Generator().manual_seed(seed)
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])
    return torch.randint(0, vocab, seq_idx.shape, generator=g), seq_idx


def documents(rows: list[list[int]]):
    """(row, columns) of every document."""
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            yield r, slice(start, start + n)
            start += n


def grads(module: torch.nn.Module, loss_fns) -> dict[str, torch.Tensor]:
    """Parameter gradients of the sum of the losses, each backward on its own (as separate steps accumulate)."""
    module.zero_grad(set_to_none=True)
    for fn in loss_fns:
        fn().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict) -> tuple[float, float]:
    """Every tensor's max |got - want| within GRAD_RTOL of max(1, its max |want|). Returns the largest
    such ratio and the largest |got - want|."""
    assert got.keys() == want.keys()
    diffs = {k: float((got[k] - want[k]).abs().max()) for k in want}
    ratios = {k: diffs[k] / max(1.0, float(want[k].abs().max())) for k in want}
    assert max(ratios.values()) <= GRAD_RTOL, sorted(ratios.items(), key=lambda kv: kv[1])[-3:]
    return max(ratios.values()), max(diffs.values())


def assert_packed_equals_alone(module, run, ids, seq_idx, rows, loss_weights) -> tuple[float, float, float]:
    """run(ids, seq_idx) → (B, T, V) outputs; loss = Σ log_softmax(out) · loss_weights. Packed once vs
    each document alone: outputs within ATOL, gradients (loss over the packed rows vs the sum of the
    documents' losses) as `assert_grads_close` says. Returns the largest output difference and its figures."""
    def loss(r, cols, seq):
        out = run(ids[r, cols], seq)
        return out, (out.log_softmax(-1) * loss_weights[r, cols]).sum()

    with torch.no_grad():
        packed = run(ids, seq_idx)
        alone = torch.cat([torch.cat([run(ids[r : r + 1, c], None) for rr, c in documents(rows) if rr == r], 1)
                           for r in range(len(rows))])
    g_packed = grads(module, [lambda: loss(slice(None), slice(None), seq_idx)[1]])
    g_alone = grads(module, [lambda r=r, c=c: loss(slice(r, r + 1), c, None)[1] for r, c in documents(rows)])
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)
    assert len(g_packed) == len(list(module.parameters()))
    return float((packed - alone).abs().max()), *assert_grads_close(g_packed, g_alone)


def test_packed_parent_equals_each_document_alone():
    cfg = tiny_config()
    assert set(cfg.pattern) == set("M*E-") and cfg.chunk_size == 4
    model = randomize(HybridLM(cfg), seed=0, scale=0.2)
    ids, seq_idx = packed_batch(ROWS, cfg.vocab_size)
    weights = torch.randn(*ids.shape, cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    diffs = assert_packed_equals_alone(model, lambda i, s: model(i, seq_idx=s), ids, seq_idx, ROWS, weights)
    print("parent: max |logits diff|, gradient ratio, max |grad diff|", diffs)
    with torch.no_grad():  # the check has teeth: without seq_idx, documents see their predecessors
        unpacked = model(ids)[0]
        alone = torch.cat([model(ids[:1, c]) for r, c in documents(ROWS) if r == 0], 1)[0]
    assert (unpacked - alone).abs().max() > 0.1


def test_packed_elastic_model_at_a_budget_equals_each_document_alone():
    """forward_sampled at budget 0.5: the same Gumbel picks (same noise) for every call, masks
    from the router; the router's gradients (through the masks) are compared too."""
    elastic = tiny_elastic().train()
    ids, seq_idx = packed_batch(ROWS, elastic.config.vocab_size, seed=2)
    weights = torch.randn(*ids.shape, elastic.config.vocab_size, generator=torch.Generator().manual_seed(3))

    def run(i, s):
        logits, picks = elastic.forward_sampled(i, 0.5, TAU, torch.Generator().manual_seed(4), seq_idx=s)
        assert any(int(p.argmax()) > 0 for p in picks.values())  # a submodel, not the parent
        return logits

    diffs = assert_packed_equals_alone(elastic, run, ids, seq_idx, ROWS, weights)
    print("elastic 0.5: max |logits diff|, gradient ratio, max |grad diff|", diffs)


DISTILL_ROWS = ROWS[::2]  # one row per process in the FSDP check


def distill_setup(seed: int = 0):
    """The tiny elastic student, a random parent-shaped teacher, packed rows, their LM loss masks."""
    torch.manual_seed(seed)  # the router's initialisation
    elastic = tiny_elastic(seed=seed).train()
    teacher = randomize(HybridLM(elastic.config), seed=seed + 1, scale=0.2).eval().requires_grad_(False)
    ids, seq_idx = packed_batch(DISTILL_ROWS, elastic.config.vocab_size, seed=seed + 2)
    # a target that starts a document would be predicted from the one before it: no CE there
    lm_mask = torch.cat([torch.ones(len(ids), 1), (seq_idx[:, 1:] == seq_idx[:, :-1]).float()], dim=1)
    return elastic, teacher, ids, seq_idx, lm_mask


def distill_loss(engine, ids, seq_idx, lm_mask) -> torch.Tensor:
    """One DistillStep at budget 0.5 over ids (B, T), teacher called alike → (KL sum, CE sum) stacked."""
    with torch.no_grad():
        hidden = engine.teacher(ids, head=False, seq_idx=seq_idx)
    kl, ce, _ = engine.student(ids, 0.5, TAU, torch.Generator().manual_seed(5), hidden, engine.teacher.lm_head,
                               torch.ones(ids.shape), lm_mask=lm_mask, seq_idx=seq_idx)
    return torch.stack([kl, ce])


def distill_alone(engine, ids, lm_mask):
    """Each document of DISTILL_ROWS run alone (its own row, no seq_idx): ((rows, 2) KL and CE sums per
    row, gradients of the sum of all the documents' KL + CE, one backward each)."""
    runs = [(r, lambda r=r, c=c: distill_loss(engine, ids[r : r + 1, c], None, lm_mask[r : r + 1, c]))
            for r, c in documents(DISTILL_ROWS)]
    with torch.no_grad():
        sums = torch.zeros(len(DISTILL_ROWS), 2)
        for r, run in runs:
            sums[r] += run()
    return sums, grads(engine.state_module.elastic, [lambda run=run: run().sum() for _, run in runs])


def test_packed_distill_step_under_activation_checkpointing_equals_each_document_alone():
    """DistillStep (chunked KD + CE, teacher called with seq_idx) with each block checkpointed:
    the packed rows' KL and CE sums and their gradients equal the documents' own."""
    elastic, teacher, ids, seq_idx, lm_mask = distill_setup()
    engine = parallelize(DistillStep(elastic, chunk_tokens=16), teacher, "none", 0, 1,
                         EngineConfig(activation_checkpointing=True))
    with torch.no_grad():
        packed = distill_loss(engine, ids, seq_idx, lm_mask)
    sums, g_alone = distill_alone(engine, ids, lm_mask)
    torch.testing.assert_close(packed, sums.sum(0), atol=ATOL, rtol=SUM_RTOL)
    g_packed = grads(elastic, [lambda: distill_loss(engine, ids, seq_idx, lm_mask).sum()])
    assert any(k.startswith("router.") for k in g_packed)
    print("distill + checkpointing: gradient ratio, max |grad diff|", assert_grads_close(g_packed, g_alone))


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_packed_scan_equals_the_recurrence_restarted_per_document(chunk):
    """ssd_chunked over packed rows vs the float64 step recurrence run on each document from a zero
    state, with decays from slow to underflowing fp32 (floored in the scan); final state = last document's."""
    g = torch.Generator().manual_seed(chunk)
    rows = [[3, 1, 5, 2, 11, 4, 3], [2, 27]]
    _, seq_idx = packed_batch(rows, 2)
    b, T, H, P, G, N = 2, 29, 4, 3, 2, 5
    x = torch.randn(b, T, H, P, generator=g)
    dt = torch.rand(b, T, H, generator=g) * 10
    A = -torch.tensor([0.05, 1.0, 8.0, 20.0])
    Bm, Cm = torch.randn(b, T, G, N, generator=g), torch.randn(b, T, G, N, generator=g)
    y, final = ssd_chunked(x, dt, A, Bm, Cm, chunk, seq_idx=seq_idx)
    for r, c in documents(rows):
        part = (slice(r, r + 1), c)
        y_ref, final_ref = recurrence_f64(x[part], dt[part], A, Bm[part], Cm[part], torch.zeros(1, H, P, N))
        torch.testing.assert_close(y[part].double(), y_ref, atol=1e-5, rtol=1e-5)
        if c.stop == T:  # the row's last document
            torch.testing.assert_close(final[r : r + 1].double(), final_ref, atol=1e-5, rtol=1e-5)


def test_terms_across_documents_are_exactly_zero():
    """A document whose inputs are all zero has outputs of exactly zero, whatever came before it:
    slow decays (A near 0) and large earlier inputs, so a decay-only cut-off would leak."""
    g = torch.Generator().manual_seed(0)
    b, T, H, P, G, N = 1, 13, 2, 3, 1, 4
    seq_idx = torch.tensor([[0] * 6 + [1] * 7])  # the second document starts mid-chunk (chunk 4)
    x = torch.randn(b, T, H, P, generator=g) * 1e6 * (seq_idx == 0)[..., None, None]
    dt = torch.rand(b, T, H, generator=g)
    A = -torch.tensor([1e-3, 100.0])  # no decay / a decay past the floor of exp's argument
    Bm, Cm = torch.randn(b, T, G, N, generator=g), torch.randn(b, T, G, N, generator=g)
    y, _ = ssd_chunked(x, dt, A, Bm, Cm, 4, seq_idx=seq_idx)
    assert y[:, :6].abs().max() > 1 and torch.equal(y[:, 6:], torch.zeros_like(y[:, 6:]))
    leaky, _ = ssd_chunked(x, dt, A, Bm, Cm, 4)
    assert leaky[:, 6:].abs().max() > 1


def test_one_document_per_row_is_exactly_the_unpacked_path():
    """seq_idx of one document per row (all zeros, or any constant) gives bit for bit the logits
    and gradients of seq_idx=None."""
    model = randomize(HybridLM(tiny_config()), seed=3, scale=0.2)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(2, 13, 97, generator=torch.Generator().manual_seed(1))
    runs = []
    for seq_idx in (None, torch.zeros_like(ids), torch.full_like(ids, 7)):
        logits = model(ids, seq_idx=seq_idx)
        g = grads(model, [lambda: (logits.log_softmax(-1) * weights).sum()])
        runs.append((logits.detach(), g))
    for logits, g in runs[1:]:
        assert torch.equal(logits, runs[0][0])
        assert all(torch.equal(g[k], runs[0][1][k]) for k in g)


def test_seq_idx_errors_name_the_problem():
    model = randomize(HybridLM(tiny_config()), seed=0)
    ids = torch.randint(0, 97, (1, 6))
    with pytest.raises(ValueError, match="cached generation"):
        model(ids, cache=model.new_cache(), seq_idx=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(ids, seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0]]))
    with pytest.raises(ValueError, match=r"shaped like input_ids \(1, 6\)"):
        model(ids, seq_idx=torch.zeros(1, 5, dtype=torch.long))


def test_packed_under_two_process_fsdp_equals_each_document_alone(tmp_path):
    """2 processes (torchrun, gloo), FSDP2 student and teacher, activation checkpointing: each
    process one packed row of the batch. The gathered gradients (FSDP averages over processes)
    equal those of every document run alone in this process, halved."""
    worker = Path(__file__).with_name("packed_worker.py")
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(worker), str(tmp_path)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-2500:] + job.stderr[-2500:]
    two = load_file(tmp_path / "grads.safetensors")
    two_sums = torch.tensor([json.loads((tmp_path / f"sums-{r}.json").read_text()) for r in range(2)])  # (rank, 2)

    elastic, teacher, ids, seq_idx, lm_mask = distill_setup()
    sums, g_one = distill_alone(parallelize(DistillStep(elastic, chunk_tokens=16), teacher, "none", 0, 1, EngineConfig()), ids, lm_mask)
    torch.testing.assert_close(two_sums, sums, atol=ATOL, rtol=SUM_RTOL)
    assert any(k.startswith("router.") for k in g_one)
    two = {k.removeprefix("elastic."): v for k, v in two.items()}
    print("fsdp: gradient ratio, max |grad diff|", assert_grads_close(two, {k: v / 2 for k, v in g_one.items()}))
