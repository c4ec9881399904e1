"""Recipe: train the demo's small reasoning parent on CPU, then measure it by generation.

    star-elastic train-parent --out runs/parent [--config configs/parent.yaml] [--steps N]

setup (tokenizer, data splits, model) → train (AdamW, warmup + cosine, loss on the assistant
tokens only) → evaluate (greedy generation on the test split, answer parsed after </think>) →
save (Hugging Face `nemotron_h` directory with tokenizer) → report.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from star_elastic.config import ConfigError, ModelConfig, from_dict, merge_config, to_plain, typed_blocks
from star_elastic.data import synthetic
from star_elastic.data.tokenizer import build_tokenizer, encode_example, format_prompt
from star_elastic.hf import save_model
from star_elastic.infer.generate import GenerationConfig, generate
from star_elastic.model.hybrid import HybridLM

# The embedded default parent: every block type, 8 experts (top-2), two SSM groups.
DEFAULT_PARENT = dict(
    hidden_size=128, pattern="M*EM-EM*E", num_attention_heads=8, num_key_value_heads=2, head_dim=16,
    intermediate_size=256, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4,
    chunk_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
    moe_shared_expert_intermediate_size=128, routed_scaling_factor=1.0, max_position_embeddings=512,
)


@dataclasses.dataclass
class ParentConfig:
    """Training of the demo parent. Every field can be set in YAML or with a CLI flag."""

    out: str = ""
    """Output model directory (Hugging Face nemotron_h layout)."""
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(**DEFAULT_PARENT))
    """The architecture (ModelConfig keys); vocabulary and special token ids come from the tokenizer."""
    width_scale: float = 1.0
    """Multiplies hidden, head and intermediate sizes (0.5 gives the half-size comparison model)."""
    n_train: int = 60000
    """Training problems generated (sampled with replacement by step)."""
    n_val: int = 256
    n_test: int = 400
    """Held-out problems for the reported accuracy."""
    steps: int = 3000
    batch_size: int = 48
    micro_batch_size: int | None = 16
    """Problems per forward (gradient accumulation; must divide batch_size): the step's problems are
    sorted by length and each micro-batch padded only to its own longest. None: one forward."""
    lr: float = 4e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_batch_size: int = 200
    max_new_tokens: int = 160
    threads: int | None = 1
    """torch threads (one: the same bytes on a machine type whatever else runs); None keeps torch's default."""

    def __post_init__(self) -> None:
        typed_blocks(self)
        for name in ("n_train", "n_test", "steps", "batch_size", "eval_batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        micro = self.micro_batch_size
        if micro is not None and (micro <= 0 or self.batch_size % micro):
            raise ConfigError(f"micro_batch_size must be a positive divisor of batch_size {self.batch_size}, "
                              f"got {self.micro_batch_size}")
        if not 0 < self.width_scale <= 4:
            raise ConfigError(f"width_scale must be in (0, 4], got {self.width_scale}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")


def model_config(cfg: ParentConfig, tokenizer) -> ModelConfig:
    """The parent's ModelConfig: the configured sizes, scaled, with the tokenizer's vocabulary."""
    m = {}
    if cfg.width_scale != 1.0:
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "moe_shared_expert_intermediate_size"):
            m[key] = max(8, int(round(getattr(cfg.model, key) * cfg.width_scale / 8)) * 8)
        m["mamba_head_dim"] = max(4, int(round(cfg.model.mamba_head_dim * cfg.width_scale)))
        m["head_dim"] = max(4, int(round(cfg.model.head_dim * cfg.width_scale)))
    return cfg.model.replace(
        **m, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def length_groups(lengths: list[int], rows: int | None) -> list[list[int]]:
    """Row indices in groups of `rows` (None: one group of all), for gradient accumulation.

    Rows are sorted by length (shortest first, ties in row order) before they are cut, so each
    group can be trimmed to its own longest row: a right-padded row's real tokens never see the
    padding after them (causal model), so the groups' summed losses and gradients are the whole
    batch's, with less padding computed. Every group has the same number of rows (`rows` divides
    the batch): under FSDP every process must run the same number of forwards.
    """
    if rows is None or rows >= len(lengths):
        return [list(range(len(lengths)))]
    if len(lengths) % rows:
        raise ConfigError(f"micro_batch_size {rows} must divide the {len(lengths)} rows of each process's batch")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + rows] for i in range(0, len(order), rows)]


def make_batch(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, loss_mask) pairs → ids (B, T) and a target mask (B, T-1) for next-token loss."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    for i, (tok, m) in enumerate(encoded):
        ids[i, : len(tok)] = torch.tensor(tok)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, mask[:, 1:]


def lm_loss(model: HybridLM, ids: torch.Tensor, target_mask: torch.Tensor, count=None) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked (assistant) positions; with `count`, the sum
    divided by it instead (a micro-batch's share of the whole batch's mean)."""
    logits = model(ids[:, :-1])  # (B, T-1, V)
    losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    return (losses * target_mask).sum() / (target_mask.sum().clamp_min(1) if count is None else count)


def accumulate_lm(model: HybridLM, picked: list[tuple[list[int], list[int]]], rows: int | None, pad_id: int):
    """Forward and backward of one step's problems in micro-batches (`length_groups`); returns the
    batch's mean loss (detached when split). One group: exactly `lm_loss` on the padded batch."""
    groups = length_groups([len(ids) for ids, _ in picked], rows)
    if len(groups) == 1:
        loss = lm_loss(model, *make_batch(picked, pad_id))
        loss.backward()
        return loss
    count = float(sum(sum(m[1:]) for _, m in picked))  # every target position of the batch
    total = 0.0
    for group in groups:
        loss = lm_loss(model, *make_batch([picked[i] for i in group], pad_id), count=max(count, 1.0))
        loss.backward()
        total += loss.item()
    return torch.tensor(total)


def lr_at(step: int, total: int, cfg: ParentConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: HybridLM, tokenizer, examples: list[dict], cfg: ParentConfig, desc: str = "eval") -> dict:
    """Exact-match accuracy by greedy generation; per family and level too."""
    model.eval()
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    correct: list[bool] = []
    for start in tqdm(range(0, len(examples), cfg.eval_batch_size), desc=desc, file=sys.stderr, leave=False):
        chunk = examples[start : start + cfg.eval_batch_size]
        prompts = [tokenizer.encode(format_prompt(tokenizer, ex["prompt"]), add_special_tokens=False) for ex in chunk]
        outs = generate(model, prompts, gen)
        for ex, out in zip(chunk, outs):
            text = "<think>" + tokenizer.decode(out, skip_special_tokens=False)
            correct.append(synthetic.check_answer(text, ex["answer"]))
    return summarise(examples, correct)


def summarise(examples: list[dict], correct: list[bool]) -> dict:
    groups: dict[str, list[bool]] = {}
    for ex, ok in zip(examples, correct):
        groups.setdefault(f"{ex['family']}/{ex['level']}", []).append(ok)
    return {
        "accuracy": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "by_task": {k: sum(v) / len(v) for k, v in sorted(groups.items())},
    }


def train_parent(cfg: ParentConfig, out: str | Path | None = None) -> tuple[HybridLM, dict]:
    """Train, evaluate and (if `out`) save the parent. Returns the model and its report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    splits = synthetic.make_splits(cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.seed)
    train = [encode_example(tokenizer, ex) for ex in splits["train"]]
    mcfg = model_config(cfg, tokenizer)
    model = HybridLM(mcfg).init_weights(cfg.seed)
    model.tokenizer = tokenizer
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embeddings" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    rng = random.Random(cfg.seed)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train-parent", file=sys.stderr, dynamic_ncols=True)
    losses, tokens = [], 0
    model.train()
    for step in bar:  # a fixed number of steps: the parent is the same on a slow machine and a fast one
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg)
        picked = [train[rng.randrange(len(train))] for _ in range(cfg.batch_size)]
        tokens += sum(len(ids) for ids, _ in picked)  # non-padding positions, as the baselines count them
        opt.zero_grad(set_to_none=True)
        loss = accumulate_lm(model, picked, cfg.micro_batch_size, mcfg.pad_token_id)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{group['lr']:.1e}")
    bar.close()
    train_s = time.perf_counter() - t0
    result = evaluate(model, tokenizer, splits["test"], cfg, desc="test")
    report = {
        "params": model.num_parameters(), "steps": len(losses), "tokens": tokens, "train_seconds": round(train_s, 1),
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "test": result,
        "config": to_plain(cfg), "model_config": mcfg.to_dict(), "threads": torch.get_num_threads(),
    }
    if out is not None:
        out = Path(out)
        save_model(model, out)
        (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return model, report


def load_parent_config(path: str | None, overrides: dict) -> ParentConfig:
    """YAML file (optional) then CLI overrides, validated once."""
    data = merge_config(path, overrides)
    return from_dict(ParentConfig, data, source=path or "train-parent flags")
