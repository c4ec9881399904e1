"""The parallel engines against one process, on CPU with gloo and two processes (torchrun).

Two torchrun "nodes" (one process each, c10d rendezvous on 127.0.0.1) run every multi-process
phase (FSDP2 with the parent loaded on the meta device and with it loaded whole, DDP, DCP resume at
the same and at a changed world size, QAD loaded on the meta device and whole, QAD stopped and resumed,
the gather of a sharded model); the references run in this process. The kill -9 test
starts `star-elastic elastify` itself, under torchrun and alone, and kills it mid-checkpoint.
SGD, because AdamW divides by √v + eps and router gradients sit near eps, which turns
~1e-8 reduction-order differences into visible ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from jobs import alive, descendants, elastify_job, free_port
from safetensors.torch import load_file
from test_elastify import TINY_PARENT, save_tiny_parent

from star_elastic import HybridLM, ModelConfig, save_model
from star_elastic.config import from_dict
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.distributed import EngineConfig, gathered, parallelize
from star_elastic.elastic import importance
from star_elastic.elastic.run import load_elastic
from star_elastic.quant.qad import QuantizeConfig, quantize_run
from star_elastic.train.distill import DistillStep
from star_elastic.train.elastify import ElastifyConfig, prepare, stage_of, state_digest, step_budgets, train

BASE = dict(data="synthetic", steps=4, batch_size=4, n_synthetic=100, calibration_batches=3, router_fit_steps=20,
            stage1_seq_len=24, stage2_seq_len=32, checkpoint_every=2, optimizer="sgd", lr=0.5, router_lr=0.5,
            warmup_steps=1)


MICRO_BATCH = dict(budget_sampling="micro_batch", micro_batch_size=1)  # a budget per row: 4 per step
QAD = dict(quant={"format": "fp8"}, qad_steps=4, batch_size=4, seq_len=24, calibration_batches=2, n_synthetic=100,
           optimizer="sgd", lr=0.5, engine={"kd_chunk_tokens": 16})
ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineConfig)}


def _engine(cfg: dict) -> dict:
    """`cfg` with its engine keys (parallel, load, micro_batch_size, ...) moved into its engine block."""
    engine = dict(cfg.get("engine", {})) | {k: v for k, v in cfg.items() if k in ENGINE_KEYS}
    return {k: v for k, v in cfg.items() if k not in ENGINE_KEYS} | ({"engine": engine} if engine else {})


def _cfg(parent, out, **changes) -> dict:
    return _engine(BASE | {"model": str(parent), "out": str(out)} | changes)


def _latest_step(ckpt_dir: Path) -> int:
    pointer = ckpt_dir / "latest"
    return int(pointer.read_text().removeprefix("step-")) if pointer.is_file() else 0


def _kill_9_after(job: subprocess.Popen, ckpt_dir: Path, step: int, writing: bool) -> None:
    """SIGKILL the job and every process it started (torchrun's workers run in sessions of their
    own) once checkpoint `step` is complete, or with `writing` already while it is being written
    (its temporary folder exists)."""
    while not (writing and (ckpt_dir / f".step-{step:06d}.tmp").exists() or _latest_step(ckpt_dir) >= step):
        assert job.poll() is None, f"the job ended before checkpoint {step}: ...{job.log.read_text()[-2000:]}"
        time.sleep(0.002)
    pids = [job.pid] + descendants(job.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    while any(alive(pid) for pid in pids):
        time.sleep(0.01)


def _two_nodes(phases: list[dict], root: Path) -> None:
    """Two torchrun "nodes" of one process each on 127.0.0.1, joined by c10d rendezvous (the
    multi-node path: `--nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT`)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = Path(__file__).with_name("dist_worker.py")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(r), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "star-elastic-test", str(worker), json.dumps(phases), str(root)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        logs = [node.communicate(timeout=1800)[0] for node in nodes]  # a bound on a hung job, not a timing
    finally:
        for node in nodes:
            node.kill()
    tails = "\n".join(f"node {r}: ...{log[-2500:]}" for r, log in enumerate(logs))
    assert [n.returncode for n in nodes] == [0, 0], tails


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run folder, keyed by name, plus each phase's per-rank summaries."""
    root = tmp_path_factory.mktemp("dist")
    p = save_tiny_parent(root / "parent")
    quiet = lambda msg: None  # noqa: E731
    one = train(from_dict(ElastifyConfig, _cfg(p, root / "one", parallel="none", save_initial=True)), log=quiet)
    (root / "one-rank0.json").write_text(json.dumps(one, default=str))
    for name, changes in (("qad_one", {}), ("qad_one_unchunked", {"kd_chunk_tokens": 10**6}),  # one chunk: full logits
                          ("qad_one_micro", {"micro_batch_size": 1})):
        qcfg = _engine(QAD | {"run": str(root / "one"), "out": str(root / name), "parallel": "none"} | changes)
        (root / f"{name}-rank0.json").write_text(json.dumps(quantize_run(from_dict(QuantizeConfig, qcfg), log=quiet)))
    train(from_dict(ElastifyConfig, _cfg(p, root / "one_stop", parallel="none", stop_after=2)), log=quiet)
    train(from_dict(ElastifyConfig, _cfg(p, root / "one_mb", parallel="none", **MICRO_BATCH)), log=quiet)
    phases = [
        {"name": "fsdp", "cfg": _cfg(p, root / "fsdp", activation_checkpointing=True, save_initial=True)},  # meta load
        {"name": "fsdp_full", "cfg": _cfg(p, root / "fsdp_full", activation_checkpointing=True, load="full")},
        {"name": "fsdp_offload",
         "cfg": _cfg(p, root / "fsdp_offload", activation_checkpointing=True, optimizer_offload=True)},
        {"name": "fsdp_stop", "cfg": _cfg(p, root / "fsdp_resumed", activation_checkpointing=True, stop_after=2),
         "copy_to": str(root / "two_to_one")},
        {"name": "fsdp_resume", "cfg": _cfg(p, root / "fsdp_resumed", activation_checkpointing=True, resume=True)},
        {"name": "ddp", "cfg": _cfg(p, root / "ddp", parallel="ddp", micro_batch_size=1)},  # 2 forwards, no_sync
        {"name": "fsdp_micro", "cfg": _cfg(p, root / "fsdp_micro", activation_checkpointing=True, micro_batch_size=1)},
        {"name": "fsdp_mb", "cfg": _cfg(p, root / "fsdp_mb", activation_checkpointing=True, **MICRO_BATCH)},
        {"name": "one_to_two", "cfg": _cfg(p, root / "one_stop", resume=True)},
        {"name": "qad", "kind": "quantize",  # 2 forwards per process; meta load (auto under fsdp)
         "cfg": _engine(QAD | {"run": str(root / "one"), "out": str(root / "qad_two"), "micro_batch_size": 1})},
        {"name": "qad_full", "kind": "quantize",
         "cfg": _engine(QAD | {"run": str(root / "one"), "out": str(root / "qad_full"), "micro_batch_size": 1,
                               "load": "full"})},
        {"name": "qad_stop", "kind": "quantize",
         "cfg": _engine(QAD | {"run": str(root / "one"), "out": str(root / "qad_resumed"), "micro_batch_size": 1,
                               "stop_after": 2})},
        {"name": "qad_resume", "kind": "quantize",
         "cfg": _engine(QAD | {"run": str(root / "one"), "out": str(root / "qad_resumed"), "micro_batch_size": 1,
                               "resume": True})},
        {"name": "gather", "kind": "gather", "cfg": {"run": str(root / "one")}},
    ]
    _two_nodes(phases, root)
    train(from_dict(ElastifyConfig, _cfg(p, root / "two_to_one", parallel="none", resume=True)), log=quiet)
    return root


def _weights(run) -> dict[str, torch.Tensor]:
    elastic = load_elastic(run)
    return elastic.model.state_dict() | {f"router.{k}": v for k, v in elastic.router.state_dict().items()}


def _max_diff(a, b) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def _summary(runs, name, rank=0) -> dict:
    return json.loads((runs / f"{name}-rank{rank}.json").read_text())


def test_fsdp_two_processes_equal_one_process(runs):
    assert _summary(runs, "fsdp")["parallel"] == "fsdp" and _summary(runs, "fsdp")["world"] == 2
    assert _max_diff(runs / "one", runs / "one" / "initial") > 1e-3  # training moved the weights
    assert _max_diff(runs / "fsdp", runs / "one") < 1e-6


def test_meta_loaded_sharded_student_equals_load_then_sort(runs):
    """Each rank filled its FSDP2 shards from the files, sorted per tensor; gathered, they equal
    one process's whole-model load + sort_model exactly (with the same fitted router)."""
    assert _summary(runs, "fsdp")["load"] == "meta" and _summary(runs, "one")["load"] == "full"
    meta, whole = _weights(runs / "fsdp" / "initial"), _weights(runs / "one" / "initial")
    assert meta.keys() == whole.keys()
    for k in whole:
        assert torch.equal(meta[k], whole[k]), k


def test_meta_loaded_training_equals_full_load(runs):
    assert _summary(runs, "fsdp_full")["load"] == "full" and _summary(runs, "fsdp_full")["world"] == 2
    assert _summary(runs, "fsdp")["state_sha256"] == _summary(runs, "fsdp_full")["state_sha256"]


def test_optimizer_offload_is_bitwise_the_same_training(runs):
    assert _summary(runs, "fsdp_offload")["state_sha256"] == _summary(runs, "fsdp")["state_sha256"]


def _qad_numbers(summary) -> torch.Tensor:
    return torch.tensor([summary["kd_ptq"], summary["kd_final"], *summary["qad_loss_first"]], dtype=torch.float64)


def _qrun_tensors(qrun: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((qrun / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


def _qrun_digest(qrun: Path) -> str:
    """SHA-256 over the written QRUN tensors (packed weights, scales, BF16 rest), in key order."""
    h = hashlib.sha256()
    for key, t in sorted(_qrun_tensors(qrun).items()):
        h.update(key.encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_qad_on_the_engine_two_processes_equal_one_process(runs):
    """QAD (fake-quantized student, router frozen) under FSDP2 with 2 processes, student and teacher
    loaded on the meta device and filled shard by shard, each process in 2 micro-batches: held-out KD
    before and after, and every step's loss, equal one process's with the run loaded whole (one
    forward per step, SGD); the input scales, calibrated through the sharded engine, are one
    process's exactly."""
    two, one = _summary(runs, "qad"), _summary(runs, "qad_one")
    assert (two["parallel"], two["world"], two["load"]) == ("fsdp", 2, "meta")
    assert (one["world"], one["load"]) == (1, "full") and len(one["qad_loss_first"]) == 4
    assert abs(one["kd_final"] - one["kd_ptq"]) > 1e-5  # QAD moved the weights
    torch.testing.assert_close(_qad_numbers(two), _qad_numbers(one), atol=1e-7, rtol=0)
    scales_two, scales_one = _qrun_tensors(runs / "qad_two"), _qrun_tensors(runs / "qad_one")
    scales = [k for k in scales_one if k.endswith(".input_scale")]
    assert len(scales) > 10 and all(torch.equal(scales_two[k], scales_one[k]) for k in scales)


def test_qad_meta_load_equals_full_load_under_fsdp(runs):
    assert _summary(runs, "qad_full")["load"] == "full" and _summary(runs, "qad")["load"] == "meta"
    assert _qrun_digest(runs / "qad_full") == _qrun_digest(runs / "qad_two")


def test_qad_resumed_after_a_stop_equals_uninterrupted(runs):
    """Stopped after step 2 (a DCP checkpoint, with the calibrated scales), then resumed: the written
    QRUN is the uninterrupted run's byte for byte, and its numbers are the same."""
    stopped, resumed = _summary(runs, "qad_stop"), _summary(runs, "qad_resume")
    assert not stopped["finished"] and stopped["kd_final"] is None and len(stopped["qad_loss_first"]) == 2
    assert (runs / "qad_resumed" / "checkpoints" / "step-000002").is_dir()
    assert _qrun_digest(runs / "qad_resumed") == _qrun_digest(runs / "qad_two")
    assert _qad_numbers(resumed).tolist() == _qad_numbers(_summary(runs, "qad")).tolist()


def test_gathered_gives_the_module_itself_or_the_full_state_on_rank_0(runs):
    """`distributed.gathered`: none and ddp hand back the module (every rank holds it whole); fsdp
    gathers the shards onto rank 0 (the run's weights exactly) and gives the other rank nothing."""
    want = state_digest(load_elastic(runs / "one").model)
    r0, r1 = _summary(runs, "gather", 0), _summary(runs, "gather", 1)
    assert r0["ddp"] == r1["ddp"] == "self"
    assert r0["fsdp"] == want and r1["fsdp"] is None
    elastic = load_elastic(runs / "one")
    engine = parallelize(DistillStep(elastic), None, "none", 0, 1, EngineConfig())
    assert gathered(engine, elastic.model, None) is elastic.model


def test_qad_micro_batches_equal_one_forward(runs):
    """QAD with one sequence per forward in one process (4 forwards per step): the same held-out KD
    and step losses as one forward per step. (The 2-process QAD phase runs in micro-batches too.)"""
    torch.testing.assert_close(_qad_numbers(_summary(runs, "qad_one_micro")), _qad_numbers(_summary(runs, "qad_one")),
                               atol=1e-7, rtol=0)


def test_qad_chunked_kd_equals_full_logits(runs):
    chunked, full = _summary(runs, "qad_one"), _summary(runs, "qad_one_unchunked")
    torch.testing.assert_close(_qad_numbers(chunked), _qad_numbers(full), atol=1e-7, rtol=0)


def test_importance_gathered_over_ranks_equals_one_process(runs):
    one = importance.load_scores(runs / "one" / "importance.safetensors")
    two = importance.load_scores(runs / "fsdp" / "importance.safetensors")  # batches 0, 2 on rank 0; 1 on rank 1
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)


def test_ddp_ranks_identical_and_equal_one_process(runs):  # in micro-batches (no_sync)
    assert _summary(runs, "ddp", 0)["state_sha256"] == _summary(runs, "ddp", 1)["state_sha256"]
    assert _max_diff(runs / "ddp", runs / "one") < 1e-6


def test_micro_batches_under_fsdp_equal_one_process(runs):
    """Each process's 2 sequences in 2 forwards (gradient accumulation: FSDP2 reduce-scatters after
    each and adds up the sharded gradients): the weights of one process with one forward per step.
    (The DDP phase runs in micro-batches too: `no_sync` until the last.)"""
    assert (_summary(runs, "fsdp_micro")["parallel"], _summary(runs, "fsdp_micro")["world"]) == ("fsdp", 2)
    assert _max_diff(runs / "fsdp_micro", runs / "one") < 1e-6


def test_budget_per_micro_batch_under_fsdp_equals_one_process(runs):
    """budget_sampling micro_batch, one row per micro-batch: process 0 trains global micro-batches 0
    and 1, process 1 micro-batches 2 and 3, each at its own draw (in some steps the full model on one
    process while the other trains a submodel: the router runs on both); the weights of one process
    running all four."""
    cfg = from_dict(ElastifyConfig, _cfg(runs / "parent", runs / "fsdp_mb", **MICRO_BATCH))
    draws = [step_budgets(cfg, (1.0, 0.75, 0.5), s, stage_of(cfg, s), 4) for s in range(cfg.steps)]
    assert any((d[j] == (1.0,)) != (d[2 + j] == (1.0,)) for d in draws for j in (0, 1))
    assert (_summary(runs, "fsdp_mb")["parallel"], _summary(runs, "fsdp_mb")["world"]) == ("fsdp", 2)
    assert _max_diff(runs / "one_mb", runs / "one") > 1e-3  # another training than one budget per step
    assert _max_diff(runs / "fsdp_mb", runs / "one_mb") < 1e-6


def test_dcp_resume_at_same_world_size_is_bitwise(runs):
    assert not _summary(runs, "fsdp_stop")["finished"]
    assert _summary(runs, "fsdp_resume")["state_sha256"] == _summary(runs, "fsdp")["state_sha256"]
    assert state_digest(load_elastic(runs / "fsdp_resumed")) == state_digest(load_elastic(runs / "fsdp"))
    steps = [json.loads(line)["step"] for line in (runs / "fsdp_resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_dcp_resume_at_another_world_size(runs):
    assert _summary(runs, "one_to_two")["world"] == 2
    assert _max_diff(runs / "one_stop", runs / "one") < 1e-6  # written by 1 process, finished by 2
    assert _max_diff(runs / "two_to_one", runs / "one") < 1e-6  # written by 2 processes, finished by 1


def test_activation_checkpointing_gives_bitwise_equal_gradients(tmp_path):
    tok = build_tokenizer()
    model = HybridLM(ModelConfig(**TINY_PARENT, vocab_size=len(tok))).init_weights(0)
    model.tokenizer = tok
    save_model(model, tmp_path / "parent")
    grads = []
    for ac in (False, True):
        cfg = from_dict(ElastifyConfig, _cfg(tmp_path / "parent", tmp_path / "run"))
        torch.manual_seed(0)  # the same router initialisation for both
        elastic, teacher, _ = prepare(cfg, log=lambda m: None)
        engine = parallelize(DistillStep(elastic, chunk_tokens=16), teacher, "none", 0, 1,
                             EngineConfig(activation_checkpointing=ac))
        ids = torch.randint(3, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            hidden = engine.teacher(ids, head=False)
        kl, _, picks = engine.student(ids, 0.5, 1.0, torch.Generator().manual_seed(2), hidden + 0.1,
                                      engine.teacher.lm_head, torch.ones(2, 24))
        (kl + sum(p @ torch.arange(len(p), dtype=p.dtype) for p in picks.values())).backward()
        grads.append({n: p.grad.clone() for n, p in elastic.named_parameters() if p.grad is not None})
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("router.") for k in grads[0])
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_kill_9_mid_run_resumes_bitwise_and_across_world_sizes(runs, tmp_path):
    """kill -9 of a running torchrun elastify job (2 processes) once checkpoint 2 is being written;
    its checkpoint resumed by 2 processes equals the uninterrupted run bit for bit. A copy resumed
    by 1 process is killed again after one more checkpoint, then finished by 2 processes (2 → 1 → 2)
    and equals the one-process run. A partially written checkpoint is never picked up: `latest`
    only ever names complete ones, and a truncated newer one left in place is ignored."""
    job_cfg = _cfg(runs / "parent", tmp_path / "killed", activation_checkpointing=True, checkpoint_every=1)
    _kill_9_after(elastify_job(job_cfg, 2, tmp_path), tmp_path / "killed" / "checkpoints", 2, writing=True)
    ckpts = tmp_path / "killed" / "checkpoints"
    assert 1 <= _latest_step(ckpts) <= 2
    newest = ckpts / f"step-{_latest_step(ckpts):06d}"
    assert (newest / "state.json").is_file() and (newest / ".metadata").is_file()
    partial = ckpts / f".step-{_latest_step(ckpts) + 1:06d}.tmp"  # what a save cut short leaves behind
    if not partial.exists():
        shutil.copytree(newest, partial)
        (partial / "state.json").unlink()
    for shard in partial.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shutil.copytree(tmp_path / "killed", tmp_path / "hop")

    one_cfg = _cfg(runs / "parent", tmp_path / "hop", parallel="none", checkpoint_every=1, resume=True)
    hop = tmp_path / "hop" / "checkpoints"
    _kill_9_after(elastify_job(one_cfg, 1, tmp_path), hop, _latest_step(ckpts) + 1, writing=False)
    assert _latest_step(ckpts) < _latest_step(hop) < BASE["steps"]  # the newest checkpoint is one process's

    _two_nodes([{"name": "killed", "cfg": job_cfg | {"resume": True}},
                {"name": "hop", "cfg": _cfg(runs / "parent", tmp_path / "hop", resume=True)}], tmp_path)
    assert _summary(tmp_path, "killed")["state_sha256"] == _summary(runs, "fsdp")["state_sha256"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert _summary(tmp_path, "hop")["world"] == 2 and _max_diff(tmp_path / "hop", runs / "one") < 1e-6
