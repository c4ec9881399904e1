"""Memory planner for elastification: per-GPU bytes by part, from config.json alone.

    star-elastic plan MODEL --gpus N --gpu-memory-gb G --seq-len L --micro-batch-size B \
        [--parallel auto|none|ddp|fsdp] [--dtype bf16] [--activation-checkpointing] [--optimizer-offload] [--json]

It plans for the engine `EngineConfig.mode(gpus)` resolves to (star_elastic.distributed), with N
processes, one per GPU:
  student states   fp32 master params 4 B + fp32 grads 4 B + AdamW m, v 8 B = 16 B/param; FSDP
                   shards them over N (on the CPU with --optimizer-offload); one process and DDP hold
                   them whole on every GPU
  teacher          frozen parent in the compute dtype: FSDP holds 1/N of it plus its root unit
                   (embeddings, final norm, LM head) gathered so the chunked loss can apply the head;
                   one process and DDP hold it whole
  activations      saved tensors of the student's forward for backward, per token per layer by block
                   kind (one block input per layer with activation checkpointing, plus one layer
                   recomputed), plus the teacher's and the student's final hidden states
  kd_chunk         the chunked distillation loss: ~6 fp32 (chunk, V) tensors live at once
  comm_buffers     FSDP: the student's root unit gathered (from forward to the end of backward), two
                   block units in flight (prefetch) and one block's unsharded fp32 gradients before its
                   reduce-scatter; DDP: its gradient buckets, a second fp32 copy of every gradient
                   (`gradient_as_bucket_view` is off); one process: none
Activations are an estimate of what the PyTorch implementation saves (not a measurement); the
benchmark `benchmarks/bench_fsdp_memory.py` prints this plan ÷ the measured growth on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from star_elastic import accounting
from star_elastic.config import ConfigError, ModelConfig, typed_blocks
from star_elastic.distributed.config import EngineConfig
from star_elastic.distributed.parallel import device_for_rank

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
STATE_BYTES_PER_PARAM = 16  # fp32 master (4) + fp32 grad (4) + AdamW exp_avg, exp_avg_sq (8)
KD_CHUNK_TENSORS = 6  # teacher logits, log p_t, p_t, student logits, log p_s, their product / grads


@dataclasses.dataclass
class PlanConfig:
    """`star-elastic plan MODEL`: the run to plan."""

    model: str = ""
    """Model directory (config.json is enough; weights are not read)."""
    gpus: int = 1
    """GPUs, one process each."""
    seq_len: int = 8192
    """Tokens per sequence (plan the longest stage)."""
    batch_size: int | None = None
    """Sequences per step over all GPUs; default one per GPU. Each GPU runs its share in forwards of
    `micro_batch_size` sequences."""
    engine: EngineConfig = dataclasses.field(default_factory=lambda: EngineConfig(dtype="bf16", parallel="fsdp"))
    """The engine to plan for (the same block as elastify's)."""
    json: bool = False
    """Print one JSON object on standard output."""

    def __post_init__(self) -> None:
        typed_blocks(self)
        for name in ("gpus", "seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"plan: {name} must be positive, got {getattr(self, name)}")
        if self.batch_size is not None and (self.batch_size <= 0 or self.batch_size % self.gpus):
            raise ConfigError(f"plan: batch_size must be a positive multiple of gpus {self.gpus}, got {self.batch_size}")

    @property
    def sequences_per_forward(self) -> int:
        share = (self.batch_size or self.gpus) // self.gpus
        return min(self.engine.micro_batch_size or share, share)


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
    engine, n = pc.engine, pc.gpus
    mode = engine.mode(n)
    P = accounting.count_params(cfg).total_params
    cb = DTYPE_BYTES[engine.dtype]
    shards = n if mode == "fsdp" else 1
    tokens = pc.seq_len * pc.sequences_per_forward
    root = root_params(cfg)
    largest_block = max(accounting.layer_params(cfg, b) for b in set(cfg.pattern))
    states = 0 if engine.optimizer_offload else P * STATE_BYTES_PER_PARAM // shards
    per_layer = [layer_activation_elems(cfg, b) for b in cfg.pattern]
    if engine.activation_checkpointing:
        act_elems = len(per_layer) * cfg.hidden_size + max(per_layer)
    else:
        act_elems = sum(per_layer)
    comm = {"fsdp": root * cb + 2 * largest_block * cb + largest_block * 4, "ddp": P * 4, "none": 0}[mode]
    parts = {
        "student_params": states * 4 // STATE_BYTES_PER_PARAM,
        "student_grads": states * 4 // STATE_BYTES_PER_PARAM,
        "optimizer_states": states * 8 // STATE_BYTES_PER_PARAM,
        "teacher": P * cb // shards + (root * cb * (n - 1) // n if mode == "fsdp" else 0),
        "activations": tokens * (act_elems + 2 * cfg.hidden_size) * cb,
        "kd_chunk": min(engine.kd_chunk_tokens, tokens) * cfg.vocab_size * 4 * KD_CHUNK_TENSORS,
        "comm_buffers": comm,
    }
    total = sum(parts.values())
    memory = engine.gpu_memory_gb
    limit = None if memory is None else int(memory * 1e9)
    return {
        "params": P, "mode": mode, "state_bytes": P * STATE_BYTES_PER_PARAM // shards,
        "config": {"gpus": n, "seq_len": pc.seq_len, "sequences_per_forward": pc.sequences_per_forward,
                   "dtype": engine.dtype, "activation_checkpointing": engine.activation_checkpointing,
                   "optimizer_offload": engine.optimizer_offload, "kd_chunk_tokens": engine.kd_chunk_tokens},
        "parts": parts, "per_gpu_bytes": total, "gpu_memory_bytes": limit,
        "fits": None if limit is None else total <= limit,
    }


def format_plan(result: dict) -> str:
    pc = result["config"]
    gib = 2**30
    lines = [f"plan: {pc['gpus']} GPU(s), {result['mode']}, {pc['sequences_per_forward']} x {pc['seq_len']} tokens "
             f"per forward, {pc['dtype']}"
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


def check_plan(pc: PlanConfig, doing: str, log) -> dict:
    """The recipes' memory check before any weights are read: log the plan of `pc` and refuse
    (ConfigError, one line after the logged plan) when it cannot fit the GPU memory, given as
    gpu_memory_gb or read from this process's CUDA device (unknown on CPU: logged only). `doing`
    names the run ("elastifying", "QAD")."""
    device = device_for_rank()
    if pc.engine.gpu_memory_gb is None and device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 1e9
        pc = dataclasses.replace(pc, engine=dataclasses.replace(pc.engine, gpu_memory_gb=memory))
    result = plan(ModelConfig.from_json(accounting._config_path(pc.model)), pc)
    log(format_plan(result))
    if result["fits"] is False:
        need, have = result["per_gpu_bytes"] / 2**30, result["gpu_memory_bytes"] / 2**30
        raise ConfigError(f"{pc.model}: {doing} needs more memory per GPU than there is ({need:.2f} GiB planned, "
                          f"{have:.2f} GiB per GPU; the plan above): use more GPUs, --activation-checkpointing, "
                          "--optimizer-offload, --dtype bf16 or a shorter --seq-len")
    return result


def plan_command(pc: PlanConfig) -> int:
    """`star-elastic plan MODEL ...`: reads only MODEL/config.json. Exit status 1 when it does not fit."""
    result = plan(ModelConfig.from_json(accounting._config_path(pc.model)), pc)
    if pc.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_plan(result))
    return 1 if result["fits"] is False else 0
