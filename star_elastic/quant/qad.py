"""Recipe: quantize an elastic run once — PTQ calibration, then optional nested QAD — and export.

    star-elastic quantize RUN --format fp8|nvfp4 --data DATA [--qad-steps N] --out QRUN [--resume true|auto]
        [--parallel auto|none|ddp|fsdp] [--dtype fp32|bf16] [--activation-checkpointing] [--optimizer-offload]
        [--load auto|full|meta]
    torchrun --nproc-per-node G -m star_elastic.cli quantize RUN ...      (FSDP2, as elastify)

QAD runs on elastify's engine (star_elastic.distributed, the `engine` block): the same `DistillStep`
(chunked KD from the final hidden states, no (B, T, V) logits), the global batch split by rows over
the processes and the loss normalised by its global token count; the same memory plan, checked
before any weight is read; the same loading: under FSDP (load auto) student and teacher are built
on the meta device, sharded and filled from RUN/model tensor by tensor, so no process holds the
whole run (the student is fake-quantized before sharding; its master weights are filled); DCP
checkpoints in QRUN/checkpoints and a `resume` as elastify's (one writer per folder; a resume
continues exactly or refuses a changed key, train/runfolder.py).

PTQ: fake-quantize the shared weights (global scales of the full tensors) and calibrate one static
input scale per linear over every trained budget, through the engine: every rank runs every
calibration batch whole, so all hold the same scales (taken in the engine's compute dtype). QAD
(paper, pipeline point 9): distil from the BF16 elastic model at each sampled budget into the
fake-quantized one, router frozen (each budget's architecture fixed), budgets sampled with the run's
stage-2 probabilities. QRUN is an elastic run folder whose model/ holds packed weights;
`star-elastic slice QRUN` cuts slices from them.

Data as elastify reads it (`data.loading.open_data`; a file or the synthetic set prepared once into
QRUN/data): packed rows of seq_len tokens with their seq_idx, KD at the positions whose next token
is a loss token (`kd_positions`); calibration, held-out and QAD rows each from a sampler of their
own seed; the QAD sampler's position is saved in each checkpoint (`--resume` takes the next row).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from star_elastic.config import ConfigError, QuantConfig, typed_blocks
from star_elastic.data.loading import check_micro_batch_size, check_store, open_data_on_ranks, split_rows
from star_elastic.data.sampler import PackedSampler, key_of
from star_elastic.distributed import (
    EngineConfig,
    gathered,
    global_sum,
    init_process_group,
    parallelize,
    prepare_teacher,
)
from star_elastic.distributed.loading import fill_from_checkpoint, meta_model
from star_elastic.elastic.run import load_router, read_run_metadata
from star_elastic.hf import load_model
from star_elastic.model.hybrid import HybridLM
from star_elastic.plan import PlanConfig, check_plan
from star_elastic.quant.export import quant_metadata, quantized_state, write_quantized
from star_elastic.quant.fake import InputQuant, apply_fake_quant, plain_state, set_mode
from star_elastic.train.checkpoint import load_checkpoint, save_checkpoint
from star_elastic.train.distill import DistillStep
from star_elastic.train.elastify import default_stage2_probs, kd_positions, pad_id
from star_elastic.train.runfolder import PREPARED, Recipe, open_run, read_record, resume_setting

QUANTIZE = Recipe("quantize", ("run.json", "model", "router.safetensors", "importance.safetensors",
                               "latency_table.json", "quantize_report.json", "checkpoints", PREPARED),
                  run_keys=("engine", "resume", "overwrite", "checkpoint_every", "stop_after", "out"),
                  sources=("run", "data"))
"""QRUN's files, and what a resumed QAD may change: how the steps are computed and when it stops or saves."""


@dataclasses.dataclass
class QuantizeConfig:
    """PTQ + QAD of an elastic run."""

    run: str = ""
    """Elastic run folder (BF16 / FP32) to quantize."""
    out: str = ""
    """Quantized run folder (QRUN) to write."""
    data: str = "synthetic"
    """Calibration and QAD data: a token store folder (prepare-data), a .jsonl / .parquet file
    (prepared into QRUN/data once), or "synthetic" (the built-in reasoning set, the same way)."""
    quant: QuantConfig | None = None
    """The format (required: `--format fp8|nvfp4`) and which modules are quantized."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """Parallelism, precision, memory and loading (the same block as elastify's)."""
    qad_steps: int = 0
    """QAD steps after PTQ (0: PTQ only)."""
    calibration_batches: int = 4
    """Batches of activation statistics for the static input scales."""
    batch_size: int = 16
    """Packed rows per QAD step in all (the global batch), split evenly over the processes."""
    seq_len: int = 128
    """Tokens per packed row."""
    lr: float = 2e-5
    """AdamW rate. On the demo run 2e-5 lowered the held-out KD most in 60 NVFP4 steps; 2e-4 raised it (docs/history.md)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw, or sgd (plain; used to compare engines, where Adam amplifies rounding)."""
    budget_probs: tuple[float, ...] | None = None
    """QAD budget probabilities, largest first; None: the run's stage-2 probabilities (RUN/elastify_config.json),
    else elastify's default (0.5 / 0.3 / 0.2 for three budgets)."""
    n_synthetic: int = 5000
    """Problems of the built-in synthetic set (data synthetic)."""
    checkpoint_every: int = 50
    """Write a DCP checkpoint (QRUN/checkpoints) every this many QAD steps, and after the last."""
    stop_after: int | None = None
    """Stop (after checkpointing) once this many QAD steps are done: for preemption tests."""
    resume: bool | str = False
    """true: continue QRUN from QRUN/checkpoints/latest (an error without one); auto: continue when
    there is a checkpoint, else start (again); false: start, refusing a folder that holds a quantize
    run. A resume refuses a change to any key that shapes the result (the `engine` block,
    checkpoint_every and stop_after may change)."""
    overwrite: bool = False
    """Start again in a folder holding an earlier quantize run: every file that run wrote is deleted first."""
    seed: int = 0

    def __post_init__(self) -> None:
        typed_blocks(self)
        if self.quant is None:
            raise ConfigError("quantize needs --format fp8|nvfp4 (or 'quant: {format: ...}' in the YAML config)")
        if self.qad_steps < 0 or self.calibration_batches <= 0 or self.batch_size <= 0 or self.seq_len <= 1:
            raise ConfigError("qad_steps must be >= 0; calibration_batches, batch_size and seq_len positive")
        if self.checkpoint_every <= 0 or (self.stop_after is not None and self.stop_after <= 0):
            raise ConfigError(f"checkpoint_every and stop_after must be positive, got {self.checkpoint_every} and "
                              f"{self.stop_after}")
        self.resume = resume_setting(self.resume, self.overwrite)


def budget_probs(cfg: QuantizeConfig, run: Path, budgets: tuple[float, ...]) -> list[float]:
    """QAD's budget probabilities, largest budget first: `budget_probs`, else the stage-2 ones the
    run was elastified with (RUN/elastify_config.json), else elastify's `default_stage2_probs`."""
    if cfg.budget_probs is not None:
        if len(cfg.budget_probs) != len(budgets):
            raise ConfigError(f"budget_probs needs {len(budgets)} entries, got {list(cfg.budget_probs)}")
        return list(cfg.budget_probs)
    record = read_record(run)
    if record is None or "stage2_probs" not in record["config"]:
        return list(default_stage2_probs(len(budgets)))
    config = record["config"]
    if list(config.get("elastic", {}).get("budgets", ())) != list(budgets):
        raise ConfigError(f"{run}: elastify_config.json's budgets {config.get('elastic', {}).get('budgets')} are not "
                          f"run.json's {list(budgets)}; pass --budget-probs")
    return [float(p) for p in config["stage2_probs"]]


def kd_sums(engine, ids: torch.Tensor, mask: torch.Tensor, budget: float, hidden=None, seq_idx=None) -> torch.Tensor:
    """Σ KL(BF16 teacher ‖ quantized student) over `mask`, at `budget`'s fixed architecture (chunked);
    `hidden`: the teacher's final hidden states for `ids`, when already at hand; seq_idx: packed rows'."""
    if hidden is None:
        with torch.no_grad():
            hidden = engine.teacher(ids, head=False, seq_idx=seq_idx)
    return engine.student(ids, budget, None, None, hidden, engine.teacher.lm_head, mask, seq_idx=seq_idx)[0]


def mean_kd(engine, budgets, batches) -> float:
    """Average KD loss over the held-out batches and every budget; every rank runs them all."""
    total = 0.0
    with engine.evaluating():
        for b in budgets:
            for rows in batches:
                ids, mask, seq_idx = (t.to(engine.device) for t in (rows.ids, kd_positions(rows.mask), rows.seq_idx))
                total += float(kd_sums(engine, ids, mask, b, seq_idx=seq_idx) / mask.sum().clamp_min(1))
    return total / (len(budgets) * len(batches))


def calibrate(cfg: QuantizeConfig, engine, budgets, store, pad: int, quantizers: dict[str, InputQuant]) -> None:
    """PTQ: one static input scale per linear, the amax over every calibration batch at every
    budget's architecture. Forwards of the engine's student (each rank runs every batch whole, so
    all ranks record the same amax); the KD sums are discarded."""
    sampler = PackedSampler(store, cfg.seq_len, seed=key_of(cfg.seed, "calibration"), pad_id=pad)
    with engine.evaluating():
        for _ in range(cfg.calibration_batches):
            rows = sampler.next_rows(cfg.batch_size)
            ids, seq_idx = rows.ids.to(engine.device), rows.seq_idx.to(engine.device)
            hidden = engine.teacher(ids, head=False, seq_idx=seq_idx)
            for b in budgets:
                kd_sums(engine, ids, torch.zeros_like(ids), b, hidden, seq_idx)
    set_mode(quantizers, "quantize")


def make_optimizer(cfg: QuantizeConfig, engine) -> torch.optim.Optimizer:
    params = [p for p in engine.state_module.parameters() if p.requires_grad]
    make = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
    return make(params, lr=cfg.lr, weight_decay=0.0)


def qad(cfg: QuantizeConfig, engine, opt, budgets, probs, sampler, start: int, history: list[float],
        checkpoint) -> list[float]:
    """Nested QAD on the engine from step `start`: one budget per step, this rank's rows of the global
    batch (the next of `sampler`); `checkpoint(done)` every checkpoint_every steps, after the last and
    at stop_after. Every step's budget is a function of (seed, step) and its rows follow the sampler's
    saved position, so a resumed run is the same run."""
    params = [p for group in opt.param_groups for p in group["params"]]
    rank, world = engine.rank, engine.world
    engine.student.train()
    for step in tqdm(range(start, cfg.qad_steps), desc="qad", file=sys.stderr, dynamic_ncols=True, disable=rank != 0,
                     initial=start, total=cfg.qad_steps):
        b = random.Random(f"qad:{cfg.seed}:{step}").choices(budgets, weights=probs)[0]
        rows = sampler.next_rows(cfg.batch_size, rank, world)
        n = global_sum(rows.mask.sum().float().to(engine.device)).clamp_min(1)  # the global batch's KD tokens
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        parts = split_rows(rows, cfg.engine.micro_batch_size, rank)
        for j, (_, g) in enumerate(parts):
            with engine.gradient_sync(j == len(parts) - 1):
                ids, mask, seq_idx = (t.to(engine.device) for t in (g.ids, kd_positions(g.mask), g.seq_idx))
                part = kd_sums(engine, ids, mask, b, seq_idx=seq_idx) * world / n  # the engines average over ranks
                part.backward()
            loss = loss + part.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(float(global_sum(loss) / world))
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done in (cfg.qad_steps, cfg.stop_after):
            checkpoint(done)
        if cfg.stop_after is not None and done >= cfg.stop_after:
            break
    return history


def load_models(model_dir: Path, load: str, mode: str, engine: EngineConfig):
    """(student, teacher, fill for `parallelize`): the run's model twice, the teacher frozen in the
    compute dtype (`prepare_teacher`). meta: both built on the meta device; the teacher is sharded
    and filled here, the student by `parallelize` with `fill`. full: read once, the student a copy."""
    if load == "meta":
        fill = partial(fill_from_checkpoint, path=model_dir)
        return meta_model(model_dir), prepare_teacher(meta_model(model_dir), mode, engine, fill=fill), fill
    teacher = load_model(model_dir).eval()
    student = copy.deepcopy(teacher)
    return student, prepare_teacher(teacher, mode, engine), None


def quantize_run(cfg: QuantizeConfig, log=None) -> dict:
    """PTQ (and QAD) of the run `cfg.run` into QRUN `cfg.out`; returns the summary and this process's
    rank. The checks that need no weights run first (the run folder, the memory plan); then rank 0
    writes QRUN, holding its writer lock to the end."""
    mode, rank, world = init_process_group(cfg.engine)
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    check_micro_batch_size(cfg.engine.micro_batch_size, cfg.batch_size, world)
    log = log or (lambda msg: print(msg, file=sys.stderr) if rank == 0 else None)
    run = Path(cfg.run)
    if Path(cfg.out).resolve() == run.resolve():
        raise ConfigError(f"--out {cfg.out}: is the run being quantized; name a new folder for QRUN")
    meta = read_run_metadata(run)
    if meta.get("quantization"):
        raise ConfigError(f"{run}: already quantized ({meta['quantization']['format']}); quantize the BF16 run")
    probs = budget_probs(cfg, run, tuple(meta["elastic"]["budgets"]))
    if cfg.qad_steps:
        check_plan(PlanConfig(model=str(run / "model"), gpus=world, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                              engine=cfg.engine), "QAD", log)
    with open_run(cfg, rank, log, QUANTIZE) as latest:
        return quantize_recipe(cfg, latest, mode, rank, world, meta, probs, log)


def quantize_recipe(cfg: QuantizeConfig, latest: Path | None, mode: str, rank: int, world: int, meta: dict,
                    probs: list[float], log) -> dict:
    """The recipe in an open QRUN, from checkpoint `latest` (its scales, PTQ loss and step losses
    included) or from the start; `probs`: the budgets' probabilities (`budget_probs`)."""
    run, out = Path(cfg.run), Path(cfg.out)
    load = cfg.engine.resolve_load(mode)
    student, teacher, fill = load_models(run / "model", load, mode, cfg.engine)
    quantizers = apply_fake_quant(student, cfg.quant)
    elastic = load_router(run, model=student)  # the run's router: each budget's architecture, frozen
    budgets = elastic.ecfg.budgets
    step = DistillStep(elastic.requires_grad_(False), cfg.engine.kd_chunk_tokens,
                       {b: elastic.architecture(b) for b in budgets})
    student.requires_grad_(True)
    engine = parallelize(step, teacher, mode, rank, world, cfg.engine, fill)
    log(f"engine: {mode}, {world} process(es), {cfg.engine.dtype}, {load} load, device {engine.device}")
    store = open_data_on_ranks(cfg.data, out / PREPARED, rank, model_dir=str(run / "model"), log=log,
                               tokenizer=teacher.tokenizer, n_synthetic=cfg.n_synthetic, seed=cfg.seed,
                               vocab_size=teacher.config.vocab_size)
    check_store(store, teacher.tokenizer, teacher.config.vocab_size, str(run / "model"), log)
    pad = pad_id(teacher)
    held_out = PackedSampler(store, cfg.seq_len, seed=key_of(cfg.seed, "held-out"), pad_id=pad)
    held_out = [held_out.next_rows(cfg.batch_size) for _ in range(2)]
    sampler = PackedSampler(store, cfg.seq_len, seed=key_of(cfg.seed, "qad"), pad_id=pad)
    opt = make_optimizer(cfg, engine)
    if latest is None:
        calibrate(cfg, engine, budgets, store, pad, quantizers)
        start, kd_ptq, history = 0, mean_kd(engine, budgets, held_out), []
    else:
        saved = load_checkpoint(latest, engine.state_module, opt)
        start, kd_ptq, history = saved["step"], saved["kd_ptq"], saved["history"]
        restore_scales(quantizers, saved["input_amax"])
        sampler.load_state_dict(saved["data"])
        log(f"resuming from {latest} at step {start}")
    log(f"PTQ ({cfg.quant.format}): held-out KD {kd_ptq:.4f}")

    def checkpoint(done: int) -> None:
        amax = {name: q.amax.tolist() for name, q in quantizers.items()}  # float32 values: exact in JSON
        save_checkpoint(out / "checkpoints", done, engine.state_module, opt,
                        {"seed": cfg.seed, "world": world, "kd_ptq": kd_ptq, "history": history, "input_amax": amax,
                         "data": sampler.state_dict()})

    history = qad(cfg, engine, opt, budgets, probs, sampler, start, history, checkpoint)
    finished = cfg.stop_after is None or cfg.stop_after >= cfg.qad_steps
    kd_final = mean_kd(engine, budgets, held_out) if finished else None
    if finished:
        log(f"after {cfg.qad_steps} QAD steps: held-out KD {kd_final:.4f}")
    summary = {"format": cfg.quant.format, "qad_steps": cfg.qad_steps, "lr": cfg.lr if cfg.qad_steps else None,
               "kd_ptq": kd_ptq, "kd_final": kd_final, "qad_loss_first": history[:5], "qad_loss_last": history[-5:],
               "parallel": mode, "world": world, "load": load, "finished": finished}
    trained = gathered(engine, student, partial(plain_student, student)) if finished else None
    if rank == 0 and finished:
        write_qrun(run, out, trained, cfg.quant, quantizers, meta)
        (out / "quantize_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary | {"rank": rank}


def restore_scales(quantizers: dict[str, InputQuant], amax: dict[str, list[float]]) -> None:
    """The calibrated amax a checkpoint holds, back into the input quantizers (then quantizing)."""
    if amax.keys() != quantizers.keys():
        raise ConfigError(f"checkpoint: input scales for {sorted(amax)[:3]}..., this model quantizes "
                          f"{sorted(quantizers)[:3]}...")
    for name, q in quantizers.items():
        q.amax = torch.tensor(amax[name], dtype=torch.float32)
    set_mode(quantizers, "quantize")


def plain_student(student: HybridLM, state: dict[str, torch.Tensor]) -> HybridLM:
    """The gathered student's state as a plain HybridLM holding the master weights (what
    `quantized_state` quantizes); the fake quantization stays with the sharded one."""
    return HybridLM.from_state_dict(student.config, plain_state(state), student.tokenizer)


def write_qrun(run: Path, out: Path, student, qcfg: QuantConfig, quantizers, meta: dict) -> None:
    """QRUN: run.json (+ quantization block), router, importance, and model/ with packed weights."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = quantized_state(student, qcfg, quantizers)
    write_quantized(out / "model", student.config, tensors, quant_metadata(qcfg, student.config), student.tokenizer)
    for name in ("router.safetensors", "importance.safetensors", "latency_table.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    meta = dict(meta, quantization={"format": qcfg.format, "include": list(qcfg.include),
                                    "exclude": list(qcfg.exclude), "activations": qcfg.activations})
    (out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
