"""Recipe: quantize an elastic run once — PTQ calibration, then optional nested QAD — and export.

    star-elastic quantize RUN --format fp8|nvfp4 --data DATA [--qad-steps N] --out QRUN
        [--parallel auto|none|ddp|fsdp] [--dtype fp32|bf16] [--activation-checkpointing] [--optimizer-offload]
    torchrun --nproc-per-node G -m star_elastic.cli quantize RUN ...      (FSDP2, as elastify)

PTQ: fake-quantize the shared weights (global scales of the full tensors) and calibrate one static
input scale per linear over every trained budget (every rank runs every calibration batch, so all
hold the same scales). QAD (paper, pipeline point 9): distil from the BF16 elastic model at each
sampled budget into the fake-quantized one, router frozen (each budget's architecture fixed),
budgets sampled as in stage 2 of elastification. QAD runs on elastify's engine: the same
`DistillStep` (chunked KD from the final hidden states, no (B, T, V) logits) wrapped by
star_elastic.distributed, the global batch split by rows over the processes and the loss
normalised by its global token count. QRUN is an elastic run folder whose model/ holds packed
weights; `star-elastic slice QRUN` cuts slices from them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from star_elastic.config import ConfigError, QuantConfig, typed_blocks
from star_elastic.data.loading import batch_for_step, check_micro_batch_size, load_sequences, micro_batches
from star_elastic.distributed import (
    EngineConfig,
    full_state_dict,
    global_sum,
    init_process_group,
    parallelize,
    prepare_teacher,
)
from star_elastic.elastic.arch import IndexSets
from star_elastic.elastic.model import ElasticLM
from star_elastic.elastic.run import load_elastic, read_run_metadata
from star_elastic.quant.export import quant_metadata, quantized_state, write_quantized
from star_elastic.quant.fake import apply_fake_quant, set_mode
from star_elastic.train.distill import DistillStep


@dataclasses.dataclass
class QuantizeConfig:
    """PTQ + QAD of an elastic run."""

    run: str = ""
    """Elastic run folder (BF16 / FP32) to quantize."""
    out: str = ""
    """Quantized run folder (QRUN) to write."""
    data: str = "synthetic"
    """Calibration and QAD data: jsonl / parquet, or "synthetic" (built-in reasoning set)."""
    quant: QuantConfig | None = None
    """The format (required: `--format fp8|nvfp4`) and which modules are quantized."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """Parallelism, precision, memory and loading (the same block as elastify's)."""
    qad_steps: int = 0
    """QAD steps after PTQ (0: PTQ only)."""
    calibration_batches: int = 4
    """Batches of activation statistics for the static input scales."""
    batch_size: int = 16
    """Sequences per QAD step in all (the global batch), split evenly over the processes."""
    seq_len: int = 128
    """Tokens per sequence."""
    lr: float = 2e-5
    """AdamW rate. On the demo run 2e-5 lowered the held-out KD most in 60 NVFP4 steps; 2e-4 raised it (README notes)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw, or sgd (plain; used to compare engines, where Adam amplifies rounding)."""
    budget_probs: tuple[float, ...] | None = None
    """QAD budget probabilities, largest first; None uses the run's stage-2 default (0.5 / 0.3 / 0.2)."""
    n_synthetic: int = 5000
    """Problems of the built-in synthetic set (data synthetic)."""
    seed: int = 0

    def __post_init__(self) -> None:
        typed_blocks(self)
        if self.quant is None:
            raise ConfigError("quantize needs --format fp8|nvfp4 (or 'quant: {format: ...}' in the YAML config)")
        if self.qad_steps < 0 or self.calibration_batches <= 0 or self.batch_size <= 0 or self.seq_len <= 1:
            raise ConfigError("qad_steps must be >= 0; calibration_batches, batch_size and seq_len positive")


def _probs(cfg: QuantizeConfig, budgets) -> list[float]:
    if cfg.budget_probs is not None:
        if len(cfg.budget_probs) != len(budgets):
            raise ConfigError(f"budget_probs needs {len(budgets)} entries, got {list(cfg.budget_probs)}")
        return list(cfg.budget_probs)
    default = {3: [0.5, 0.3, 0.2]}.get(len(budgets))
    return default or [1 / len(budgets)] * len(budgets)


def kd_sums(engine, ids: torch.Tensor, mask: torch.Tensor, budget: float) -> torch.Tensor:
    """Σ KL(BF16 teacher ‖ quantized student) over `mask`, at `budget`'s fixed architecture (chunked)."""
    with torch.no_grad():
        hidden = engine.teacher(ids, head=False)
    return engine.student(ids, budget, None, None, hidden, engine.teacher.lm_head, mask)[0]


def mean_kd(engine, budgets, batches) -> float:
    """Average KD loss over the held-out batches and every budget; every rank runs them all."""
    total = 0.0
    with engine.evaluating():
        for b in budgets:
            for ids, mask in batches:
                ids, mask = ids.to(engine.device), mask.to(engine.device)
                total += float(kd_sums(engine, ids, mask, b) / mask.sum().clamp_min(1))
    return total / (len(budgets) * len(batches))


def calibrate(student, elastic, cfg: QuantizeConfig, seqs, quantizers) -> None:
    """PTQ: one static input scale per linear, calibrated over every budget's architecture."""
    pad = student.config.pad_token_id
    with torch.no_grad():
        for b in elastic.ecfg.budgets:
            masks = IndexSets.prefix(elastic.config, elastic.architecture(b)).masks()
            for i in range(cfg.calibration_batches):
                student(batch_for_step(seqs, -1 - i, 0, cfg.batch_size, cfg.seq_len, pad, cfg.seed)[0], masks=masks)
    set_mode(quantizers, "quantize")


def qad(cfg: QuantizeConfig, engine, budgets, seqs, pad: int) -> list[float]:
    """Nested QAD on the engine: one budget per step, this rank's rows of the global batch."""
    params = [p for p in engine.state_module.parameters() if p.requires_grad]
    make = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
    opt = make(params, lr=cfg.lr, weight_decay=0.0)
    probs = _probs(cfg, budgets)
    rank, world = engine.rank, engine.world
    rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    history = []
    engine.student.train()
    for step in tqdm(range(cfg.qad_steps), desc="qad", file=sys.stderr, dynamic_ncols=True, disable=rank != 0):
        b = random.Random(f"qad:{cfg.seed}:{step}").choices(budgets, weights=probs)[0]
        ids, mask = batch_for_step(seqs, step, 0, cfg.batch_size, cfg.seq_len, pad, cfg.seed + 1)
        ids, mask = ids[rows].to(engine.device), mask[rows].to(engine.device)
        n = global_sum(mask.sum().float()).clamp_min(1)  # the global batch's KD tokens
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for last, (g_ids, g_mask) in micro_batches(cfg.engine.micro_batch_size, (ids != pad) | (mask > 0), ids, mask):
            with engine.gradient_sync(last):
                part = kd_sums(engine, g_ids, g_mask, b) * world / n  # the engines average the gradients over ranks
                part.backward()
            loss = loss + part.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(float(global_sum(loss) / world))
    return history


def gathered_student(engine, run: Path, qcfg: QuantConfig):
    """The trained fake-quantized student as a plain model: itself for none/ddp; for fsdp gathered
    on rank 0 into a fresh copy (other ranks get None)."""
    if engine.mode != "fsdp":
        return engine.state_module.elastic.model
    state = full_state_dict(engine.state_module)  # collective
    if engine.rank != 0:
        return None
    plain = load_elastic(run).model
    apply_fake_quant(plain, qcfg)
    prefix = "elastic.model."
    plain.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return plain


def quantize_run(cfg: QuantizeConfig, log=None) -> dict:
    mode, rank, world = init_process_group(cfg.engine)
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    check_micro_batch_size(cfg.engine.micro_batch_size, cfg.batch_size, world)
    log = log or (lambda msg: print(msg, file=sys.stderr) if rank == 0 else None)
    qcfg = cfg.quant
    run, out = Path(cfg.run), Path(cfg.out)
    meta = read_run_metadata(run)
    if meta.get("quantization"):
        raise ConfigError(f"{run}: already quantized ({meta['quantization']['format']}); quantize the BF16 run")
    elastic = load_elastic(run)
    student = copy.deepcopy(elastic.model)
    quantizers = apply_fake_quant(student, qcfg)
    seqs = load_sequences(cfg.data, student.tokenizer, cfg.n_synthetic, cfg.seed, student.config.vocab_size)
    pad = student.config.pad_token_id
    held_out = [batch_for_step(seqs, -100 - i, 0, cfg.batch_size, cfg.seq_len, pad, cfg.seed) for i in range(2)]
    calibrate(student, elastic, cfg, seqs, quantizers)

    budgets = elastic.ecfg.budgets
    archs = {b: elastic.architecture(b) for b in budgets}  # the router stays frozen: fixed per budget
    step = DistillStep(ElasticLM(student, elastic.ecfg, elastic.space, elastic.cost).requires_grad_(False),
                       cfg.engine.kd_chunk_tokens, archs)
    step.elastic.model.requires_grad_(True)
    teacher = prepare_teacher(elastic.model, mode, cfg.engine)
    engine = parallelize(step, teacher, mode, rank, world, cfg.engine)
    kd_ptq = mean_kd(engine, budgets, held_out)
    log(f"PTQ ({qcfg.format}): held-out KD {kd_ptq:.4f}")
    history = qad(cfg, engine, budgets, seqs, pad) if cfg.qad_steps else []
    kd_final = mean_kd(engine, budgets, held_out)
    log(f"after {cfg.qad_steps} QAD steps: held-out KD {kd_final:.4f}")

    trained = gathered_student(engine, run, qcfg)
    summary = {"format": qcfg.format, "qad_steps": cfg.qad_steps, "lr": cfg.lr if cfg.qad_steps else None,
               "kd_ptq": kd_ptq, "kd_final": kd_final, "qad_loss_first": history[:5], "qad_loss_last": history[-5:],
               "parallel": mode, "world": world}
    if rank == 0:
        write_qrun(run, out, elastic, trained, qcfg, quantizers, meta)
        (out / "quantize_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary | {"rank": rank}


def write_qrun(run: Path, out: Path, elastic, student, qcfg: QuantConfig, quantizers, meta: dict) -> None:
    """QRUN: run.json (+ quantization block), router, importance, and model/ with packed weights."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = quantized_state(student, qcfg, quantizers)
    write_quantized(out / "model", student.config, tensors, quant_metadata(qcfg, student.config), elastic.model.tokenizer)
    for name in ("router.safetensors", "importance.safetensors", "latency_table.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    meta = dict(meta, quantization={"format": qcfg.format, "include": list(qcfg.include),
                                    "exclude": list(qcfg.exclude), "activations": qcfg.activations})
    (out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
