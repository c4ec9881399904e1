"""Memory planner for elastification: per-GPU bytes by part, from config.json alone.

    star-elastic plan MODEL --gpus N --gpu-memory-gb G --seq-len L --micro-batch B \
        [--dtype bf16] [--activation-checkpointing] [--optimizer-offload] [--json]

The engine it plans for is star_elastic.distributed with FSDP2 over N GPUs (N = 1 in fp32 is one
process without sharding):
  student states   fp32 master params 4 B + fp32 grads 4 B + AdamW m, v 8 B = 16 B/param, / N
                   (on the CPU with --optimizer-offload)
  teacher          frozen parent in the compute dtype, / N, plus its root unit (embeddings, final
                   norm, LM head) held gathered so the chunked loss can apply the head
  activations      saved tensors of the student's forward for backward, per token per layer by block
                   kind (one block input per layer with activation checkpointing, plus one layer
                   recomputed), plus the teacher's and the student's final hidden states
  kd_chunk         the chunked distillation loss: ~6 fp32 (chunk, V) tensors live at once
  comm_buffers     FSDP2 gathered params: the student's root unit (gathered from forward to the end
                   of backward), two block units in flight (prefetch) and one block's unsharded fp32
                   gradients before its reduce-scatter
Activations are an estimate of what the PyTorch implementation saves (not a measurement); the
benchmark `benchmarks/bench_fsdp_memory.py` prints this plan ÷ the measured growth on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from star_elastic import accounting
from star_elastic.config import ConfigError, ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
STATE_BYTES_PER_PARAM = 16  # fp32 master (4) + fp32 grad (4) + AdamW exp_avg, exp_avg_sq (8)
KD_CHUNK_TENSORS = 6  # teacher logits, log p_t, p_t, student logits, log p_s, their product / grads


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    gpus: int = 1
    seq_len: int = 8192
    micro_batch: int = 1
    """Sequences per GPU per step."""
    dtype: str = "bf16"
    activation_checkpointing: bool = False
    optimizer_offload: bool = False
    kd_chunk_tokens: int = 1024
    gpu_memory_gb: float | None = None
    """GB (10^9 bytes) per GPU; None: `fits` is not decided."""

    def __post_init__(self):
        for name in ("gpus", "seq_len", "micro_batch", "kd_chunk_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"plan: {name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"plan: dtype must be one of {list(DTYPE_BYTES)}, got {self.dtype!r}")


def layer_activation_elems(cfg: ModelConfig, block: str) -> int:
    """Elements saved for backward per token by one block of `block` kind (its norm included)."""
    C = cfg.hidden_size
    if block == "M":
        d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
        gs = 2 * cfg.n_groups * cfg.ssm_state_size
        conv = d_inner + gs
        scan = 3 * cfg.mamba_num_heads * cfg.chunk_size + 2 * d_inner * cfg.ssm_state_size // cfg.chunk_size
        return 2 * C + (2 * d_inner + gs + cfg.mamba_num_heads) + 2 * conv + 5 * d_inner + scan
    if block == "*":
        q = cfg.num_attention_heads * cfg.head_dim
        return 2 * C + 3 * q + 2 * cfg.num_key_value_heads * cfg.head_dim
    if block == "E":
        k, inter = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        shared = cfg.moe_shared_expert_intermediate_size
        return 2 * C + 2 * cfg.n_routed_experts + k * (2 * C + 2 * inter) + C + 2 * shared
    return 3 * C + 2 * cfg.intermediate_size


def root_params(cfg: ModelConfig) -> int:
    """Parameters outside the blocks (one FSDP root unit): embeddings, LM head, final norm."""
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return cfg.vocab_size * cfg.hidden_size + head + cfg.hidden_size


def plan(cfg: ModelConfig, pc: PlanConfig) -> dict:
    """Per-GPU bytes by part, their sum and whether it fits (see the module docstring)."""
    n = pc.gpus
    P = accounting.count_params(cfg).total_params
    cb = DTYPE_BYTES[pc.dtype]
    sharded = n > 1 or pc.dtype == "bf16"  # fsdp; one fp32 process runs unsharded
    tokens = pc.seq_len * pc.micro_batch
    root = root_params(cfg)
    largest_block = max(accounting.layer_params(cfg, b) for b in set(cfg.pattern))
    states = 0 if pc.optimizer_offload else P * STATE_BYTES_PER_PARAM // n
    per_layer = [layer_activation_elems(cfg, b) for b in cfg.pattern]
    if pc.activation_checkpointing:
        act_elems = len(per_layer) * cfg.hidden_size + max(per_layer)
    else:
        act_elems = sum(per_layer)
    parts = {
        "student_params": states * 4 // STATE_BYTES_PER_PARAM,
        "student_grads": states * 4 // STATE_BYTES_PER_PARAM,
        "optimizer_states": states * 8 // STATE_BYTES_PER_PARAM,
        "teacher": P * cb // n + (root * cb * (n - 1) // n if sharded else 0),
        "activations": tokens * (act_elems + 2 * cfg.hidden_size) * cb,
        "kd_chunk": min(pc.kd_chunk_tokens, tokens) * cfg.vocab_size * 4 * KD_CHUNK_TENSORS,
        "comm_buffers": (root * cb + 2 * largest_block * cb + largest_block * 4) if sharded else 0,
    }
    total = sum(parts.values())
    limit = None if pc.gpu_memory_gb is None else int(pc.gpu_memory_gb * 1e9)
    return {
        "params": P, "state_bytes": P * STATE_BYTES_PER_PARAM // n, "config": dataclasses.asdict(pc),
        "parts": parts, "per_gpu_bytes": total, "gpu_memory_bytes": limit,
        "fits": None if limit is None else total <= limit,
    }


def format_plan(result: dict) -> str:
    pc = result["config"]
    gib = 2**30
    lines = [f"plan: {pc['gpus']} GPU(s), {pc['micro_batch']} x {pc['seq_len']} tokens per GPU, {pc['dtype']}"
             f"{', activation checkpointing' if pc['activation_checkpointing'] else ''}"
             f"{', optimizer offload' if pc['optimizer_offload'] else ''}; {accounting.format_count(result['params'])}"
             " parameters"]
    for name, b in result["parts"].items():
        lines.append(f"  {name:<18}{b / gib:>10.2f} GiB")
    lines.append(f"  {'per GPU':<18}{result['per_gpu_bytes'] / gib:>10.2f} GiB")
    if result["fits"] is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"  {verdict} in {result['gpu_memory_bytes'] / gib:.2f} GiB")
    return "\n".join(lines)


def plan_command(model: str | Path, pc: PlanConfig, as_json: bool = False) -> int:
    """`star-elastic plan MODEL ...`: reads only MODEL/config.json. Exit status 1 when it does not fit."""
    result = plan(ModelConfig.from_json(accounting._config_path(model)), pc)
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_plan(result))
    return 1 if result["fits"] is False else 0
