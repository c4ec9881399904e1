"""Recipe: quantize an elastic run once — PTQ calibration, then optional nested QAD — and export.

    star-elastic quantize RUN --format fp8|nvfp4 --data DATA [--qad-steps N] --out QRUN

PTQ: fake-quantize the shared weights (global scales of the full tensors) and calibrate one static
input scale per linear over every trained budget. QAD (paper, pipeline point 9): distil from the
BF16 elastic model at each sampled budget into the fake-quantized one, router frozen (each
budget's architecture fixed), budgets sampled as in stage 2 of elastification. QRUN is an elastic
run folder whose model/ holds packed weights; `star-elastic slice QRUN` cuts slices from them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from star_elastic.config import ConfigError, QuantConfig
from star_elastic.data.loading import batch_for_step, load_sequences
from star_elastic.elastic.arch import IndexSets
from star_elastic.elastic.run import load_elastic, read_run_metadata
from star_elastic.quant.export import quant_metadata, quantized_state, write_quantized
from star_elastic.quant.fake import apply_fake_quant, set_mode
from star_elastic.train.distill import kd_loss


@dataclasses.dataclass
class QuantizeConfig:
    """PTQ + QAD of an elastic run."""

    run: str = ""
    out: str = ""
    data: str = "synthetic"
    quant: dict = dataclasses.field(default_factory=dict)
    """QuantConfig fields (format, include, exclude, activations)."""
    qad_steps: int = 0
    calibration_batches: int = 4
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-5
    """AdamW rate. On the demo run 2e-5 lowered the held-out KD most in 60 NVFP4 steps; 2e-4 raised it (README notes)."""
    budget_probs: tuple[float, ...] | None = None
    """QAD budget probabilities, largest first; None uses the run's stage-2 default (0.5 / 0.3 / 0.2)."""
    n_synthetic: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.qad_steps < 0 or self.calibration_batches <= 0 or self.batch_size <= 0 or self.seq_len <= 1:
            raise ConfigError("qad_steps must be >= 0; calibration_batches, batch_size and seq_len positive")
        QuantConfig(**self.quant)


def _masks(elastic, budget: float):
    return IndexSets.prefix(elastic.config, elastic.architecture(budget)).masks()


def _probs(cfg: QuantizeConfig, budgets) -> list[float]:
    if cfg.budget_probs is not None:
        if len(cfg.budget_probs) != len(budgets):
            raise ConfigError(f"budget_probs needs {len(budgets)} entries, got {list(cfg.budget_probs)}")
        return list(cfg.budget_probs)
    default = {3: [0.5, 0.3, 0.2]}.get(len(budgets))
    return default or [1 / len(budgets)] * len(budgets)


def mean_kd(student, teacher, elastic, batches) -> float:
    """Average KD loss (BF16 teacher → quantized student) over the batches and every budget."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in elastic.ecfg.budgets:
            masks = _masks(elastic, b)
            for ids, mask in batches:
                total += float(kd_loss(student(ids, masks=masks), teacher(ids, masks=masks), mask))
                n += 1
    return total / n


def quantize_run(cfg: QuantizeConfig, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    qcfg = QuantConfig(**cfg.quant)
    run, out = Path(cfg.run), Path(cfg.out)
    meta = read_run_metadata(run)
    if meta.get("quantization"):
        raise ConfigError(f"{run}: already quantized ({meta['quantization']['format']}); quantize the BF16 run")
    elastic = load_elastic(run)
    teacher = elastic.model
    student = copy.deepcopy(teacher)
    quantizers = apply_fake_quant(student, qcfg)
    seqs = load_sequences(cfg.data, teacher.tokenizer, cfg.n_synthetic, cfg.seed, teacher.config.vocab_size)
    pad = teacher.config.pad_token_id
    held_out = [batch_for_step(seqs, -100 - i, 0, cfg.batch_size, cfg.seq_len, pad, cfg.seed) for i in range(2)]

    with torch.no_grad():  # PTQ: one static input scale per linear, calibrated over every budget
        for b in elastic.ecfg.budgets:
            for i in range(cfg.calibration_batches):
                ids, _ = batch_for_step(seqs, -1 - i, 0, cfg.batch_size, cfg.seq_len, pad, cfg.seed)
                student(ids, masks=_masks(elastic, b))
    set_mode(quantizers, "quantize")
    kd_ptq = mean_kd(student, teacher, elastic, held_out)
    log(f"PTQ ({qcfg.format}): held-out KD {kd_ptq:.4f}")

    history = []
    if cfg.qad_steps:
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
        probs = _probs(cfg, elastic.ecfg.budgets)
        student.train()
        for step in tqdm(range(cfg.qad_steps), desc="qad", file=sys.stderr, dynamic_ncols=True):
            b = random.Random(f"qad:{cfg.seed}:{step}").choices(elastic.ecfg.budgets, weights=probs)[0]
            ids, mask = batch_for_step(seqs, step, 0, cfg.batch_size, cfg.seq_len, pad, cfg.seed + 1)
            masks = _masks(elastic, b)
            with torch.no_grad():
                target = teacher(ids, masks=masks)
            loss = kd_loss(student(ids, masks=masks), target, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            history.append(loss.item())
        student.eval()
    kd_final = mean_kd(student, teacher, elastic, held_out)
    log(f"after {cfg.qad_steps} QAD steps: held-out KD {kd_final:.4f}")

    write_qrun(run, out, elastic, student, qcfg, quantizers, meta)
    summary = {"format": qcfg.format, "qad_steps": cfg.qad_steps, "lr": cfg.lr if cfg.qad_steps else None,
               "kd_ptq": kd_ptq, "kd_final": kd_final,
               "qad_loss_first": history[:5], "qad_loss_last": history[-5:]}
    (out / "quantize_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
