"""Recipe: elastify a parent — importance → sort → router fit → nested distillation → run folder.

    star-elastic elastify --model DIR --data DATA --budgets 1.0,0.75,0.5 --out RUN \
        [--budget-type active_params] [--steps N] [--seq-len L] [--config FILE.yaml] [--resume]
        [--parallel auto|none|ddp|fsdp] [--dtype fp32|bf16] [--activation-checkpointing] [--optimizer-offload]
    torchrun --nproc-per-node 2 -m star_elastic.cli elastify ...      (FSDP2: gloo on CPU, NCCL on GPU)

Parallelism (FSDP2 / DDP, mixed precision, activation checkpointing) is applied once before the
loop by star_elastic.distributed; the step itself is the same for every engine. Each step's global
batch (`batch_size` sequences) is split by rows over the processes and the losses are normalised
by the global token count, so N processes compute the gradient of one process on the whole batch.

Each step samples one budget (stage 1: uniform, short sequences; stage 2: favouring the full
model, longer sequences — paper, pipeline point 6), lets the router pick an architecture with
hard Gumbel-Softmax, and minimises KL(frozen parent ‖ masked student) + λ·router loss. All
randomness of a step is a pure function of (seed, step, rank), so a resumed run equals an
uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from star_elastic import accounting
from star_elastic.config import ConfigError, ElasticConfig, ModelConfig, from_dict, merge_config, typed_blocks
from star_elastic.data.loading import batch_for_step, check_micro_batch_size, load_sequences, micro_batches
from star_elastic.distributed import (
    EngineConfig,
    barrier,
    gathered,
    global_sum,
    init_process_group,
    on_full_copy,
    parallelize,
    prepare_teacher,
    sum_over_ranks,
)
from star_elastic.distributed.loading import fill_from_checkpoint, meta_model
from star_elastic.elastic import importance
from star_elastic.elastic.model import ElasticLM, cost_line
from star_elastic.elastic.router import (
    BudgetRouter,
    fit_router_to_cost,
    profile_latency,
    router_loss_parts,
    settle_router,
)
from star_elastic.elastic.run import build_elastic, save_run
from star_elastic.elastic.sort import sort_model, sort_rules
from star_elastic.elastic.space import ChoiceSpace
from star_elastic.hf import load_model
from star_elastic.model.hybrid import HybridLM
from star_elastic.plan import PlanConfig, check_plan
from star_elastic.quant.load import read_quant_config
from star_elastic.train.checkpoint import load_checkpoint, save_checkpoint
from star_elastic.train.distill import DistillStep
from star_elastic.train.runfolder import fingerprint, open_run, resume_setting


@dataclasses.dataclass
class ElastifyConfig:
    """One elastification run. YAML keys and CLI flags share these names."""

    model: str = ""
    """Parent model directory (transformers nemotron_h layout)."""
    data: str = ""
    """jsonl / parquet file with text, messages or input_ids; or "synthetic" (the built-in toy
    arithmetic set). Required: no recipe trains on the toy set unless told to."""
    out: str = ""
    """Run folder to write (absent or empty; an existing run needs resume or overwrite)."""
    elastic: ElasticConfig = dataclasses.field(default_factory=ElasticConfig)
    """What is elastic and which budgets are trained (budgets, budget_type, fractions, axes, choices, ...)."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """Parallelism, precision, memory and loading (star_elastic.distributed; the same block as quantize's)."""
    steps: int = 300
    """Total optimisation steps (both stages); 0 writes the sorted, cost-fitted run untrained."""
    stage1_fraction: float = 0.5
    """Share of steps in stage 1 (short context, uniform budgets)."""
    stage1_seq_len: int = 64
    stage2_seq_len: int = 128
    stage2_probs: tuple[float, ...] = ()
    """Stage-2 budget probabilities, largest budget first; empty: `default_stage2_probs` (paper: 0.5 / 0.3 / 0.2)."""
    batch_size: int = 16
    """Sequences per step in all (the global batch), split evenly over the processes."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw (betas 0.9 / 0.95) or sgd (plain; used to compare engines, where Adam amplifies rounding)."""
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
    settle_every: int = 50
    """Project the router's picks onto the budgets' windows every this many steps, in both stages,
    so that training samples the architectures the budgets end with (0: only at the stage boundary
    and after training). budget_mode none never projects."""
    router_fit_steps: int = 300
    calibration_batches: int = 8
    calibration_seq_len: int = 128
    n_synthetic: int = 20000
    checkpoint_every: int = 50
    stop_after: int | None = None
    """Stop (after checkpointing) once this many steps are done: for preemption tests."""
    resume: bool | str = False
    """true: continue RUN from RUN/checkpoints/latest (an error without one); auto: continue when
    there is a checkpoint, else start (again); false: start, refusing a folder that holds a run. A
    resume refuses a change to any key that shapes the trained state (train/runfolder.py)."""
    overwrite: bool = False
    """Start again in a folder holding an earlier run: every file that run wrote is deleted first
    (importance scores included); other files stay."""
    save_initial: bool = False
    """Also write the sorted, router-fitted, untrained state to RUN/initial (zero-shot baseline)."""
    seed: int = 0

    def __post_init__(self) -> None:
        typed_blocks(self)
        self.stage2_probs = tuple(float(p) for p in self.stage2_probs) or default_stage2_probs(len(self.elastic.budgets))
        self.tau = tuple(float(t) for t in self.tau)
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0 (0: importance, sorting and the cost-fitted router only), got {self.steps}")
        if self.settle_every < 0:
            raise ConfigError(f"settle_every must be >= 0 (0: project only at the stage boundary), got {self.settle_every}")
        for name in ("batch_size", "stage1_seq_len", "stage2_seq_len", "checkpoint_every",
                     "calibration_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.stage1_fraction <= 1:
            raise ConfigError(f"stage1_fraction must be in [0, 1], got {self.stage1_fraction}")
        if abs(sum(self.stage2_probs) - 1) > 1e-6 or any(p < 0 for p in self.stage2_probs):
            raise ConfigError(f"stage2_probs must be non-negative and sum to 1, got {list(self.stage2_probs)}")
        self.resume = resume_setting(self.resume, self.overwrite)
        if len(self.tau) != 2 or min(self.tau) <= 0:
            raise ConfigError(f"tau must be two positive temperatures, got {list(self.tau)}")
        if len(self.stage2_probs) != len(self.elastic.budgets):
            raise ConfigError(f"stage2_probs has {len(self.stage2_probs)} entries for {len(self.elastic.budgets)} "
                              f"budgets {list(self.elastic.budgets)}")


def default_stage2_probs(n: int) -> tuple[float, ...]:
    """Skewed towards the full model as the paper's 0.5 / 0.3 / 0.2: budget k ≥ 2 (largest first)
    weighs n − k + 2 (…, 3, 2), the full model the sum of the others (at least 1.5x the next one:
    0.6 / 0.4 for two budgets)."""
    rest = [n - k + 2 for k in range(2, n + 1)]
    full = max(sum(rest), 1.5 * rest[0]) if rest else 1.0
    return tuple(w / (full + sum(rest)) for w in [full, *rest])


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


def calibration_batches(cfg: ElastifyConfig, seqs, pad: int) -> list[torch.Tensor]:
    """Every calibration batch's token ids, each (batch_size, ≤ calibration_seq_len); the same on every rank."""
    return [batch_for_step(seqs, -1 - i, 0, cfg.batch_size, cfg.calibration_seq_len, pad, cfg.seed)[0]
            for i in range(cfg.calibration_batches)]


def calibration_stats(cfg: ElastifyConfig, parent: HybridLM, batches: list[torch.Tensor], rank: int,
                      world: int) -> importance.ImportanceStats:
    """Importance statistics over the calibration batches: each rank runs every world-th batch and
    the sums are added over ranks, so N processes give one process's statistics. Every rank runs
    the same number of forwards (a sharded parent gathers its weights in each): a rank out of
    batches runs one of padding only, which adds nothing."""
    pad = parent.config.pad_token_id
    mine = batches[rank::world]
    valid = [ids != pad if pad is not None else torch.ones_like(ids, dtype=torch.bool) for ids in mine]
    while len(mine) < math.ceil(cfg.calibration_batches / world):
        mine.append(torch.zeros((1, 1), dtype=torch.long))
        valid.append(torch.zeros((1, 1), dtype=torch.bool))
    stats = importance.collect_stats(parent, mine, valid)
    sums = stats.sums | {"tokens": torch.tensor(stats.tokens, dtype=torch.float64)}
    sum_over_ranks(sums)
    stats.tokens = float(sums.pop("tokens"))
    stats.sums = sums
    return stats


def importance_scores(cfg: ElastifyConfig, parent: HybridLM, seqs, rank: int, world: int, log) -> dict:
    """RUN/importance.safetensors when it was computed for this parent's weights and these
    calibration batches (a resumed run), else computed and saved with that key."""
    out = Path(cfg.out)
    scores_path = out / "importance.safetensors"
    batches = calibration_batches(cfg, seqs, parent.config.pad_token_id)
    key = {"parent": fingerprint(cfg.model), "calibration": importance.batches_fingerprint(batches)}
    reuse = importance.scores_match(scores_path, key, log)
    barrier()  # every rank decides before rank 0 writes the file
    if reuse:
        log(f"importance: reusing {scores_path}")
        return importance.load_scores(scores_path)
    scores = importance.compute_scores(calibration_stats(cfg, parent, batches, rank, world))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        importance.save_scores(scores, scores_path, key)
    return scores


def elastic_over(model: HybridLM, cfg: ElastifyConfig, scores: dict) -> ElasticLM:
    """The elastic model over the sorted `model` (or its meta-device stand-in), depth order from the scores."""
    ecfg = cfg.elastic
    layer_order = torch.argsort(scores["depth"], descending=True, stable=True).tolist()
    table = None
    if ecfg.budget_type == "latency":
        table = profile_latency(model, ChoiceSpace.build(model.config, ecfg, layer_order))
    return build_elastic(model, ecfg, None, layer_order, table)


def resolve_load(cfg: ElastifyConfig, mode: str) -> str:
    """full or meta (`EngineConfig.resolve_load`): latency budgets profile, and quantized parents
    dequantize, a whole model."""
    whole = cfg.elastic.budget_type == "latency" or read_quant_config(Path(cfg.model)) is not None
    return cfg.engine.resolve_load(mode, f"latency budgets profile, and quantized parents dequantize, a whole "
                                         f"model ({cfg.model})" if whole else None)


def prepare(cfg: ElastifyConfig, rank: int = 0, log=print, world: int = 1):
    """Load the parent whole, rank and sort it, build the elastic model. Returns (elastic, parent, seqs):
    the untouched parent is the frozen teacher (sorting makes a new model, so no extra copy)."""
    parent = load_model(cfg.model)
    seqs = load_sequences(cfg.data, parent.tokenizer, cfg.n_synthetic, cfg.seed, parent.config.vocab_size)
    scores = importance_scores(cfg, parent, seqs, rank, world, log)
    return elastic_over(sort_model(parent, scores), cfg, scores), parent.eval().requires_grad_(False), seqs


def prepare_meta(cfg: ElastifyConfig, mode: str, rank: int, log, world: int):
    """The meta-device path: the teacher is sharded and filled from the files, importance runs on
    it, and the student is built on the meta device for the engine to shard and fill, each tensor
    sorted as it streams. Returns (elastic, teacher, seqs, fill for `parallelize`)."""
    fill = partial(fill_from_checkpoint, path=cfg.model)
    teacher = prepare_teacher(meta_model(cfg.model), mode, cfg.engine, fill=fill)
    seqs = load_sequences(cfg.data, teacher.tokenizer, cfg.n_synthetic, cfg.seed, teacher.config.vocab_size)
    scores = importance_scores(cfg, teacher, seqs, rank, world, log)
    elastic = elastic_over(meta_model(cfg.model), cfg, scores)
    return elastic, teacher, seqs, partial(fill, rule=sort_rules(elastic.config, scores))


def make_optimizer(cfg: ElastifyConfig, elastic: ElasticLM) -> torch.optim.Optimizer:
    """Two groups, model then router (its own learning rate, no weight decay)."""
    groups = [
        {"params": [p for p in elastic.model.parameters() if p.requires_grad], "lr": cfg.lr,
         "weight_decay": cfg.weight_decay},
        {"params": list(elastic.router.parameters()), "lr": cfg.router_lr, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def rank_batch(cfg: ElastifyConfig, seqs, step: int, seq_len: int, pad: int, rank: int, world: int):
    """This rank's rows of the step's global batch: (ids, loss mask), each (batch_size / world, T)."""
    ids, mask = batch_for_step(seqs, step, 0, cfg.batch_size, seq_len, pad, cfg.seed)
    rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    return ids[rows], mask[rows]


def plan_config(cfg: ElastifyConfig, world: int) -> PlanConfig:
    """What the run needs per GPU with `world` processes: its longest stage, as `star-elastic plan` sees it."""
    return PlanConfig(model=cfg.model, gpus=world, seq_len=cfg.stage2_seq_len, batch_size=cfg.batch_size,
                      engine=cfg.engine)


def check_inputs(cfg: ElastifyConfig) -> None:
    """The checks that need no weights, before any are loaded: the required keys, the parent's
    config.json and the choice grid on it (a bad grid fails at once, not after importance)."""
    for key, how in (("model", "--model DIR (the parent)"), ("out", "--out RUN (the run folder)"),
                     ("data", "--data FILE.jsonl|FILE.parquet, or --data synthetic for the built-in toy "
                              "arithmetic set (there is no default)")):
        if not getattr(cfg, key):
            raise ConfigError(f"elastify needs {key}: {how}, or '{key}:' in the YAML config")
    ChoiceSpace.build(ModelConfig.from_json(accounting._config_path(cfg.model)), cfg.elastic)


def train(cfg: ElastifyConfig, log=None) -> dict:
    """Run the whole recipe; returns a summary. The checks that need no weights run first; then
    rank 0 writes the run folder, holding its writer lock (train/runfolder.py) to the end."""
    mode, rank, world = init_process_group(cfg.engine)
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    check_micro_batch_size(cfg.engine.micro_batch_size, cfg.batch_size, world)
    log = log or (lambda msg: print(msg, file=sys.stderr) if rank == 0 else None)
    check_inputs(cfg)
    check_plan(plan_config(cfg, world), "elastifying", log)
    with open_run(cfg, rank, log) as latest:
        return run_recipe(cfg, latest, mode, rank, world, log)


def run_recipe(cfg: ElastifyConfig, latest: Path | None, mode: str, rank: int, world: int, log) -> dict:
    """The recipe in an open run folder, from checkpoint `latest` or from the start."""
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    load = resolve_load(cfg, mode)
    if load == "meta":
        elastic, teacher, seqs, fill = prepare_meta(cfg, mode, rank, log, world)
    else:
        elastic, parent, seqs = prepare(cfg, rank, log, world)
        teacher, fill = prepare_teacher(parent, mode, cfg.engine), None
    ecfg = elastic.ecfg
    pad = elastic.config.pad_token_id
    ckpt_dir = out / "checkpoints"
    if latest is None:
        hist = fit_router_to_cost(elastic.router, elastic.cost, ecfg.budgets, steps=cfg.router_fit_steps, seed=cfg.seed)
        log(f"router fitted to {ecfg.budget_type} in {len(hist)} steps")
        log_settled(elastic, log)

    engine = parallelize(DistillStep(elastic, cfg.engine.kd_chunk_tokens), teacher, mode, rank, world, cfg.engine, fill)
    if latest is None:
        save_untrained(cfg, elastic, engine)
    log(f"engine: {mode}, {world} process(es), {cfg.engine.dtype}, {load} load, device {engine.device}")
    opt = make_optimizer(cfg, elastic)
    base_lrs = [g["lr"] for g in opt.param_groups]
    start = 0
    if latest is not None:
        start = load_checkpoint(latest, engine.state_module, opt)["step"]
        log(f"resuming from {latest} at step {start}")

    stage1_steps = int(round(cfg.steps * cfg.stage1_fraction))
    if rank == 0:
        keep_metrics_until(out / "metrics.jsonl", start)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(range(start, cfg.steps), desc="elastify", file=sys.stderr, disable=rank != 0, dynamic_ncols=True,
               initial=start, total=cfg.steps)
    engine.student.train()
    model_params = opt.param_groups[0]["params"]
    t0 = time.perf_counter()
    for step in bar:
        stage = 1 if step < stage1_steps else 2
        if step == stage1_steps > 0 or (step > 0 and cfg.settle_every and step % cfg.settle_every == 0):
            settle(elastic)  # hold the budgets' windows: stage 2 trains the architectures they end with
        seq_len = cfg.stage1_seq_len if stage == 1 else cfg.stage2_seq_len
        budget = budget_for_step(cfg, ecfg.budgets, step, stage)
        tau = tau_at(cfg, step)
        ids, mask = rank_batch(cfg, seqs, step, seq_len, pad, rank, world)
        ids, mask = ids.to(engine.device), mask.to(engine.device)
        attn = ((ids != pad) | (mask > 0)).float()
        # per-rank sums over global counts: the engines' gradient mean over ranks is the whole batch's
        n_kd, n_lm = global_sum(attn.sum()), global_sum(mask[:, 1:].sum().float())
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_scale(cfg, step)
        opt.zero_grad(set_to_none=True)
        kl, ce, picks, rl = accumulate(cfg, engine, elastic, step, budget, tau, ids, mask, attn, n_kd, n_lm, world)
        torch.nn.utils.clip_grad_norm_(model_params, cfg.grad_clip)
        opt.step()
        done = step + 1
        record = step_record(cfg, elastic, step, stage, budget, tau, picks, kl, ce, n_kd, n_lm, rl, t0)
        bar.set_postfix(kd=f"{record['kd']:.3f}", budget_penalty=f"{record['budget_penalty']:.4f}",
                        capacity_reward=f"{record['capacity_reward']:.4f}", budget=budget,
                        cost=f"{record['relative_cost']:.2f}",
                        arch="/".join(map(str, record["arch"].values())))
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == cfg.stop_after:
            save_checkpoint(ckpt_dir, done, engine.state_module, opt, {"seed": cfg.seed, "world": world})
        if cfg.stop_after is not None and done >= cfg.stop_after:
            break
    bar.close()
    if metrics is not None:
        metrics.close()
    finished = cfg.stop_after is None or cfg.stop_after >= cfg.steps
    final = gathered_elastic(elastic, engine)
    if final is not None and finished and cfg.steps > 0:  # training moved the router: project its picks back
        settle(final)  # into the windows (same on every replica)
        log_settled(final, log)
    if rank == 0 and finished:  # ddp: every rank holds the same replica; one writer
        save_run(final, out)
    barrier()
    return {"rank": rank, "world": world, "steps": cfg.steps, "finished": finished, "parallel": mode, "load": load,
            "state_sha256": None if final is None else state_digest(final),
            "architectures": None if final is None else {b: final.describe(b) for b in ecfg.budgets}}


def accumulate(cfg: ElastifyConfig, engine, elastic: ElasticLM, step: int, budget: float, tau: float, ids, mask, attn,
               n_kd, n_lm, world: int):
    """Forward and backward of this process's rows, in micro-batches (`micro_batches`) whose losses
    add up to the whole batch's: each is divided by the global counts, the router loss is added
    once, gradients are reduced over processes as `Engine.gradient_sync` says. Every micro-batch
    samples the step's architecture from the same Gumbel noise. Returns the summed (KL, CE), picks,
    and the router loss's (budget penalty, capacity reward)."""
    kl = ce = 0.0
    for last, (g_ids, g_mask, g_attn) in micro_batches(cfg.engine.micro_batch_size, attn, ids, mask, attn):
        with engine.gradient_sync(last):
            with torch.no_grad():
                teacher_hidden = engine.teacher(g_ids, head=False)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # Gumbel noise of this step
            g_kl, g_ce, picks = engine.student(g_ids, budget, tau, gen, teacher_hidden, engine.teacher.lm_head, g_attn,
                                               cfg.kd_temperature, g_mask.float() if cfg.lm_weight > 0 else None)
            loss = g_kl * world / n_kd.clamp_min(1)
            if last:
                rl = router_loss_parts(elastic.cost, {a: p.cpu() for a, p in picks.items()}, budget)
                loss = loss + cfg.router_weight * (rl[0] - rl[1]).float().to(loss.device)
            if cfg.lm_weight > 0:
                loss = loss + cfg.lm_weight * g_ce * world / n_lm.clamp_min(1)
            loss.backward()
        kl, ce = kl + g_kl.detach(), ce + g_ce.detach()
    return kl, ce, picks, rl


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metrics lines of steps after `step` (and a line cut short): a job killed after its
    last checkpoint logged steps that the resumed run does again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # the line being written when the job died
        if record["step"] > step:
            break
        kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def save_untrained(cfg: ElastifyConfig, elastic: ElasticLM, engine) -> None:
    """RUN (and RUN/initial with save_initial): the sorted, router-fitted, untrained state, gathered
    from the engine (no rank holds the whole student with meta loading). The gathered copy is
    dropped on return, before training."""
    initial = gathered_elastic(elastic, engine)
    if engine.rank == 0:
        save_run(initial, cfg.out)
        if cfg.save_initial:
            save_run(initial, Path(cfg.out) / "initial")


def step_record(cfg, elastic, step, stage, budget, tau, picks, kl, ce, n_kd, n_lm, rl, t0) -> dict:
    """One metrics.jsonl line; the losses are the whole batch's (summed over ranks). kd: the
    distillation KL; budget_penalty (≥ 0): the router's dead-zone loss on the cost's deviation from
    the budget; capacity_reward (0 to 0.01): the router's tie-break towards larger architectures,
    subtracted (so the objective can dip below 0 where kd is near 0); objective: what the step
    minimises, kd + router_weight·(budget_penalty − capacity_reward) (+ lm_weight·lm)."""
    kd = float(global_sum(kl) / n_kd.clamp_min(1))
    lm = float(global_sum(ce) / n_lm.clamp_min(1)) if cfg.lm_weight > 0 else None
    arch = {a: elastic.space.choices[a][int(p.argmax())] for a, p in picks.items()}
    penalty, reward = (float(t.detach()) for t in rl)
    objective = kd + cfg.router_weight * (penalty - reward) + (cfg.lm_weight * lm if lm is not None else 0.0)
    return {"step": step + 1, "stage": stage, "budget": budget, "tau": round(tau, 4), "objective": objective, "kd": kd,
            "budget_penalty": penalty, "capacity_reward": reward, "lm": lm,
            "relative_cost": float(elastic.cost.relative({a: p.detach().cpu() for a, p in picks.items()})),
            "arch": arch, "seconds": round(time.perf_counter() - t0, 2)}


def gathered_elastic(elastic: ElasticLM, engine) -> ElasticLM | None:
    """A plain (unsharded, CPU) ElasticLM with the trained weights (`gathered`): every rank for
    none/ddp, rank 0 only for fsdp (the shards are gathered there; other ranks get None)."""

    def plain(state: dict[str, torch.Tensor]) -> ElasticLM:
        model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        out = ElasticLM(HybridLM.from_state_dict(elastic.config, model_state, elastic.model.tokenizer),
                        elastic.ecfg, elastic.space, elastic.cost)
        out.router.load_state_dict({k.removeprefix("router."): v for k, v in state.items() if k.startswith("router.")})
        return out

    return gathered(engine, elastic, plain)


def settle(elastic: ElasticLM) -> None:
    """Project the router's picks onto the budgets' windows (on a plain copy of the router: the
    engines' hooks stay out of it); budget_mode none keeps the picks training left."""
    ecfg = elastic.ecfg
    if ecfg.budget_mode == "none":
        return
    on_full_copy(elastic.router, lambda: BudgetRouter(elastic.space, len(ecfg.budgets), ecfg.router_hidden),
                 lambda router: settle_router(router, elastic.cost, ecfg.budgets))


def log_settled(elastic, log) -> None:
    """One line per trained budget: target vs achieved cost; a warning where the grid misses it."""
    for b in elastic.ecfg.budgets:
        info = elastic.describe(b)
        if info["held"] is not False:  # held, or budget_mode none (no window)
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


def load_elastify_config(path: str | None, overrides: dict) -> ElastifyConfig:
    """YAML (optional) then CLI overrides; `elastic.*` overrides go into the nested block."""
    data = merge_config(path, overrides)
    return from_dict(ElastifyConfig, data, source=path or "elastify flags")
