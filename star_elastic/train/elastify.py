"""Recipe: elastify a parent — importance → sort → router fit → nested distillation → run folder.

    star-elastic elastify --model DIR --data DATA --budgets 1.0,0.75,0.5 --out RUN \
        [--budget-type active_params] [--steps N] [--seq-len L] [--config FILE.yaml] [--resume]
    torchrun --nproc-per-node 2 -m star_elastic.cli elastify ...      (DDP: gloo on CPU, NCCL on GPU)

Each step samples one budget (stage 1: uniform, short sequences; stage 2: favouring the full
model, longer sequences — paper, pipeline point 6), lets the router pick an architecture with
hard Gumbel-Softmax, and minimises KL(frozen parent ‖ masked student) + λ·router loss. All
randomness of a step is a pure function of (seed, step, rank), so a resumed run equals an
uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from star_elastic.config import ConfigError, ElasticConfig, from_dict, merge_config
from star_elastic.data.loading import batch_for_step, load_sequences
from star_elastic.elastic import importance
from star_elastic.elastic.model import cost_line
from star_elastic.elastic.router import fit_router_to_cost, profile_latency, router_loss, settle_router
from star_elastic.elastic.run import build_elastic, save_run
from star_elastic.elastic.sort import sort_model
from star_elastic.elastic.space import ChoiceSpace
from star_elastic.hf import load_model
from star_elastic.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from star_elastic.train.distill import kd_loss, lm_loss


@dataclasses.dataclass
class ElastifyConfig:
    """One elastification run. YAML keys and CLI flags share these names."""

    model: str = ""
    """Parent model directory (transformers nemotron_h layout)."""
    data: str = "synthetic"
    """jsonl / parquet file with text, messages or input_ids; or "synthetic" (built-in reasoning set)."""
    out: str = ""
    """Run folder to write."""
    elastic: dict = dataclasses.field(default_factory=dict)
    """ElasticConfig fields (budgets, budget_type, fractions, axes, choices, ...)."""
    steps: int = 300
    """Total optimisation steps (both stages); 0 writes the sorted, cost-fitted run untrained."""
    stage1_fraction: float = 0.5
    """Share of steps in stage 1 (short context, uniform budgets)."""
    stage1_seq_len: int = 64
    stage2_seq_len: int = 128
    stage2_probs: tuple[float, ...] = (0.5, 0.3, 0.2)
    """Stage-2 budget probabilities, largest budget first (paper: 0.5 / 0.3 / 0.2)."""
    batch_size: int = 16
    """Sequences per step per process."""
    lr: float = 1e-3
    router_lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """After warmup the rates follow a cosine from lr down to lr · min_lr_ratio (1.0: constant)."""
    grad_clip: float = 1.0
    kd_temperature: float = 1.0
    router_weight: float = 1.0
    """λ of the router loss."""
    lm_weight: float = 0.0
    """Optional next-token loss on the data (0: distillation only)."""
    tau: tuple[float, float] = (1.0, 0.1)
    """Gumbel temperature, annealed geometrically from first to second over training."""
    router_fit_steps: int = 300
    calibration_batches: int = 8
    calibration_seq_len: int = 128
    n_synthetic: int = 20000
    checkpoint_every: int = 50
    stop_after: int | None = None
    """Stop (after checkpointing) once this many steps are done: for preemption tests."""
    resume: bool = False
    save_initial: bool = False
    """Also write the sorted, router-fitted, untrained state to RUN/initial (zero-shot baseline)."""
    seed: int = 0

    def __post_init__(self) -> None:
        self.stage2_probs = tuple(float(p) for p in self.stage2_probs)
        self.tau = tuple(float(t) for t in self.tau)
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0 (0: importance, sorting and the cost-fitted router only), got {self.steps}")
        for name in ("batch_size", "stage1_seq_len", "stage2_seq_len", "checkpoint_every", "calibration_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.stage1_fraction <= 1:
            raise ConfigError(f"stage1_fraction must be in [0, 1], got {self.stage1_fraction}")
        if abs(sum(self.stage2_probs) - 1) > 1e-6 or any(p < 0 for p in self.stage2_probs):
            raise ConfigError(f"stage2_probs must be non-negative and sum to 1, got {list(self.stage2_probs)}")
        if len(self.tau) != 2 or min(self.tau) <= 0:
            raise ConfigError(f"tau must be two positive temperatures, got {list(self.tau)}")
        self.elastic_config()  # validates the nested elastic block now, naming bad keys

    def elastic_config(self) -> ElasticConfig:
        ecfg = from_dict(ElasticConfig, dict(self.elastic), source="elastic")
        if len(self.stage2_probs) != len(ecfg.budgets):
            raise ConfigError(
                f"stage2_probs has {len(self.stage2_probs)} entries for {len(ecfg.budgets)} budgets {list(ecfg.budgets)}"
            )
        return ecfg


# --- distributed -------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce gradients in one flat buffer (missing grads count as zero)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


# --- the stages ---------------------------------------------------------------------------------
def budget_for_step(cfg: ElastifyConfig, budgets: tuple[float, ...], step: int, stage: int) -> float:
    rng = random.Random(f"budget:{cfg.seed}:{step}")
    if stage == 1:
        return budgets[rng.randrange(len(budgets))]
    return rng.choices(budgets, weights=cfg.stage2_probs)[0]


def tau_at(cfg: ElastifyConfig, step: int) -> float:
    t0, t1 = cfg.tau
    return t0 * (t1 / t0) ** (step / max(1, cfg.steps - 1))


def lr_scale(cfg: ElastifyConfig, step: int) -> float:
    """Linear warmup, then a cosine from 1 to min_lr_ratio at the last step; a function of the step alone."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare(cfg: ElastifyConfig, log=print):
    """Load the parent, rank and sort it, build the elastic model and fit its router to the cost."""
    out = Path(cfg.out)
    ecfg = cfg.elastic_config()
    parent = load_model(cfg.model)
    if parent.tokenizer is None:
        raise ConfigError(f"{cfg.model}: no tokenizer.json next to the weights; elastify needs one to read DATA")
    seqs = load_sequences(cfg.data, parent.tokenizer, cfg.n_synthetic, cfg.seed)
    scores_path = out / "importance.safetensors"
    if scores_path.is_file():
        scores = importance.load_scores(scores_path)
        log(f"importance: reusing {scores_path}")
    else:
        calib = [batch_for_step(seqs, -1 - i, 0, cfg.batch_size, cfg.calibration_seq_len, parent.config.pad_token_id,
                                cfg.seed)[0] for i in range(cfg.calibration_batches)]
        scores = importance.compute_scores(importance.collect_stats(parent, calib))
        out.mkdir(parents=True, exist_ok=True)
        importance.save_scores(scores, scores_path)
    sorted_model = sort_model(parent, scores)
    layer_order = torch.argsort(scores["depth"], descending=True, stable=True).tolist()
    table = None
    if ecfg.budget_type == "latency":
        space = ChoiceSpace.build(sorted_model.config, ecfg, layer_order)
        table = profile_latency(sorted_model, space)
    elastic = build_elastic(sorted_model, ecfg, None, layer_order, table)
    return elastic, seqs


def train(cfg: ElastifyConfig, log=None) -> dict:
    """Run the whole recipe; returns a summary. Rank 0 writes the run folder."""
    rank, world = init_distributed()
    log = log or (lambda msg: print(msg, file=sys.stderr) if rank == 0 else None)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    elastic, seqs = prepare(cfg, log)
    ecfg = elastic.ecfg
    teacher = copy.deepcopy(elastic.model).eval().requires_grad_(False)
    pad = elastic.config.pad_token_id

    model_params = [p for p in elastic.model.parameters() if p.requires_grad]
    router_params = list(elastic.router.parameters())
    opt = torch.optim.AdamW([
        {"params": model_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": router_params, "lr": cfg.router_lr, "weight_decay": 0.0},
    ], betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in opt.param_groups]

    start = 0
    ckpt_dir = out / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if latest is not None:
        weights, state = load_checkpoint(latest, opt)
        missing, unexpected = elastic.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"model.lm_head.weight"}:
            raise ConfigError(f"{latest}: checkpoint does not match this model (missing {missing}, unexpected {unexpected})")
        start = state["step"]
        log(f"resuming from {latest} at step {start}")
    else:
        hist = fit_router_to_cost(elastic.router, elastic.cost, ecfg.budgets, steps=cfg.router_fit_steps, seed=cfg.seed)
        log(f"router fitted to {ecfg.budget_type} in {len(hist)} steps")
        log_settled(elastic, log)
        if rank == 0:
            save_run(elastic, out)
            if cfg.save_initial:
                save_run(elastic, out / "initial")

    stage1_steps = int(round(cfg.steps * cfg.stage1_fraction))
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(range(start, cfg.steps), desc="elastify", file=sys.stderr, disable=rank != 0, dynamic_ncols=True,
               initial=start, total=cfg.steps)
    elastic.train()
    t0 = time.perf_counter()
    for step in bar:
        stage = 1 if step < stage1_steps else 2
        if step == stage1_steps > 0:  # stage 2 trains the architectures the budgets will end with
            settle_router(elastic.router, elastic.cost, ecfg.budgets)
        seq_len = cfg.stage1_seq_len if stage == 1 else cfg.stage2_seq_len
        budget = budget_for_step(cfg, ecfg.budgets, step, stage)
        tau = tau_at(cfg, step)
        ids, mask = batch_for_step(seqs, step, rank, cfg.batch_size, seq_len, pad, cfg.seed)
        with torch.no_grad():
            teacher_logits = teacher(ids)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # Gumbel noise of this step
        logits, picks = elastic.forward_sampled(ids, budget, tau, gen)
        attn = (ids != pad) | (mask > 0)
        kd = kd_loss(logits, teacher_logits, attn, cfg.kd_temperature)
        rl = router_loss(elastic.cost, picks, budget)
        loss = kd + cfg.router_weight * rl.float()
        lm = lm_loss(logits, ids, mask) if cfg.lm_weight > 0 else None
        if lm is not None:
            loss = loss + cfg.lm_weight * lm
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_scale(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model_params + router_params, world)
        torch.nn.utils.clip_grad_norm_(model_params, cfg.grad_clip)
        opt.step()
        arch = {a: elastic.space.choices[a][int(p.argmax())] for a, p in picks.items()}
        record = {"step": step + 1, "stage": stage, "budget": budget, "tau": round(tau, 4), "loss": loss.item(),
                  "kd": kd.item(), "router": rl.item(), "lm": None if lm is None else lm.item(),
                  "relative_cost": float(elastic.cost.relative({a: p.detach() for a, p in picks.items()})),
                  "arch": arch, "seconds": round(time.perf_counter() - t0, 2)}
        bar.set_postfix(loss=f"{record['loss']:.3f}", kd=f"{record['kd']:.3f}", rl=f"{record['router']:.4f}",
                        budget=budget, cost=f"{record['relative_cost']:.2f}", arch="/".join(map(str, arch.values())))
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        done = step + 1
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps or done == cfg.stop_after):
            save_checkpoint(ckpt_dir, done, checkpoint_weights(elastic), opt, {"seed": cfg.seed})
        if cfg.stop_after is not None and done >= cfg.stop_after:
            break
    bar.close()
    if metrics is not None:
        metrics.close()
    finished = cfg.stop_after is None or cfg.stop_after >= cfg.steps
    if finished and cfg.steps > 0:  # training moved the router: project its picks back into the windows
        settle_router(elastic.router, elastic.cost, ecfg.budgets)
        log_settled(elastic, log)
    if rank == 0 and finished:
        save_run(elastic, out)
    if world > 1:
        dist.barrier()
    return {"rank": rank, "world": world, "steps": cfg.steps, "finished": finished,
            "state_sha256": state_digest(elastic),
            "architectures": {b: elastic.describe(b) for b in ecfg.budgets}}


def log_settled(elastic, log) -> None:
    """One line per trained budget: target vs achieved cost; a warning where the grid misses it."""
    for b in elastic.ecfg.budgets:
        info = elastic.describe(b)
        if info["held"]:
            log(f"budget {b:g}: {cost_line(info)}")
        else:
            log(f"warning: budget {b:g}: {cost_line(info)}: no architecture of the choice grid lies in the window, "
                f"{info['achieved']:.3f} is the closest achievable; use finer choices (elastic.fractions / elastic.choices)")


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor's bytes, in key order: equal digests mean identical weights."""
    import hashlib

    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_weights(elastic) -> dict[str, torch.Tensor]:
    """State dict without the tied LM head (it is the embedding matrix, restored by the tie)."""
    state = elastic.state_dict()
    if elastic.config.tie_word_embeddings:
        state.pop("model.lm_head.weight", None)
    return state


def load_elastify_config(path: str | None, overrides: dict) -> ElastifyConfig:
    """YAML (optional) then CLI overrides; `elastic.*` overrides go into the nested block."""
    data = merge_config(path, overrides)
    return from_dict(ElastifyConfig, data, source=path or "elastify flags")
