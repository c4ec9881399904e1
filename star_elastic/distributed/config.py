"""The one engine config: how a training recipe runs (elastify, quantize's QAD) and what `plan` plans for.

    engine:
      parallel: auto        # none | ddp | fsdp; auto = fsdp when torchrun starts more than one process
      dtype: bf16           # fp32, or bf16 compute over fp32 master weights (fsdp)
      activation_checkpointing: true
      micro_batch_size: 1   # sequences per forward on each process (gradient accumulation)

The CLI flags of these fields are the same for every command that trains (`--parallel`, `--dtype`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from star_elastic.config import ConfigError, typed_blocks
from star_elastic.runtime import check_device


@dataclasses.dataclass
class EngineConfig:
    """Parallelism, precision and memory settings of a training run."""

    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """auto (fsdp when launched with more than one process, else none), none, ddp or fsdp."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16: bf16 compute over fp32 master weights (needs parallel fsdp; fine in one process)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of keeping its activations."""
    optimizer_offload: bool = False
    """Keep sharded params, gradients and optimizer states in CPU memory (fsdp)."""
    micro_batch_size: int | None = None
    """Sequences per forward on each process (gradient accumulation); must divide its share of the
    batch. None: the whole share in one forward."""
    kd_chunk_tokens: int = 1024
    """Tokens per chunk of the distillation loss (the LM heads' logits exist for one chunk at a time)."""
    load: Literal["auto", "full", "meta"] = "auto"
    """How the model is loaded: full (every process loads it whole), meta (built on the meta device,
    sharded, then filled from the files tensor by tensor), auto (meta with fsdp where possible)."""
    gpu_memory_gb: float | None = None
    """Per-GPU memory the plan is checked against (default: the CUDA device's; not checked on CPU)."""
    device: str = "auto"
    """auto (CUDA where present), cpu or cuda: where each process computes (cuda = GPU LOCAL_RANK)."""

    def __post_init__(self) -> None:
        typed_blocks(self)
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ConfigError(f"micro_batch_size must be positive (or null: no accumulation), got {self.micro_batch_size}")
        if self.kd_chunk_tokens <= 0:
            raise ConfigError(f"kd_chunk_tokens must be positive, got {self.kd_chunk_tokens}")
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise ConfigError(f"gpu_memory_gb must be positive, got {self.gpu_memory_gb}")
        if self.optimizer_offload and self.parallel in ("none", "ddp"):
            raise ConfigError(f"optimizer_offload needs parallel fsdp (or auto under torchrun), got {self.parallel!r}")
        if self.dtype == "bf16" and self.parallel in ("none", "ddp"):
            raise ConfigError(f"dtype bf16 (fp32 master weights, bf16 compute) needs parallel fsdp, got "
                              f"{self.parallel!r}: pass --parallel fsdp (also fine in one process)")
        check_device(self.device)

    def mode(self, world: int) -> str:
        """The engine that runs with `world` processes: none, ddp or fsdp."""
        mode = ("fsdp" if world > 1 else "none") if self.parallel == "auto" else self.parallel
        if self.dtype == "bf16" and mode != "fsdp":
            raise ConfigError(f"dtype bf16 (fp32 master weights, bf16 compute) needs parallel fsdp, got {mode!r} "
                              f"with {world} process(es): pass --parallel fsdp (also fine in one process)")
        if self.optimizer_offload and mode != "fsdp":
            raise ConfigError(f"optimizer_offload needs parallel fsdp, got {mode!r}")
        return mode

    def resolve_load(self, mode: str, whole: str | None = None) -> str:
        """full or meta: how a recipe running as engine `mode` loads its models (the `load` field).
        `whole` says why this run needs some model whole on every process (then meta is refused
        and auto is full); None where meta loading works."""
        if self.load == "meta" and whole:
            raise ConfigError(f"load meta: {whole}; use --load full")
        if self.load == "auto":
            return "meta" if mode == "fsdp" and not whole else "full"
        return self.load
