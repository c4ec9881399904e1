"""Apply data parallelism to a training step whose model knows nothing of it.

    torchrun --nproc-per-node G [--nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT] \
        -m star_elastic.cli elastify ...

Modes (`--parallel`): "none" (one process), "ddp" (`DistributedDataParallel`, full replicas),
"fsdp" (FSDP2 `fully_shard`: every block its own unit, the budget router its own fp32 unit, the
rest — embeddings, final norm, LM head — in the root unit, which stays gathered from forward to
the end of backward so the chunked loss can apply the LM head outside the blocks), "auto" (fsdp
when launched with more than one process). The frozen teacher is sharded the same way
(`reshard_after_forward` per block) and held in the compute dtype.

`--dtype bf16` = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) over fp32 sharded
master weights (the MoE correction bias is a buffer and stays fp32). `--activation-checkpointing`
recomputes each block in backward; `--optimizer-offload` keeps sharded params, grads and optimizer
states in CPU memory (FSDP2 CPUOffloadPolicy). Big parents are built on the meta device, sharded,
then materialised and filled from the safetensors files tensor by tensor (`fill`, see loading.py).
The recipe calls `init_process_group`, `prepare_teacher` and `parallelize` once before its loop,
and `shutdown` at the end; nothing in the model or the step knows which engine runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from star_elastic.config import ConfigError
from star_elastic.distributed.config import EngineConfig
from star_elastic.runtime import resolve_device
from star_elastic.distributed.launcher import watch_launcher

# The budget router returns per-axis logits that are views of its Linear output; nothing edits them
# in place, which is what FSDP2 warns about.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Engine:
    """What `parallelize` returns: call `student` and `teacher`, give `state_module` to checkpoints."""

    mode: str
    rank: int
    world: int
    device: torch.device
    student: nn.Module
    """The wrapped step module (call it as the step module)."""
    state_module: nn.Module
    """The step module itself (DDP unwrapped): for state dicts and DCP."""
    teacher: nn.Module

    @contextmanager
    def gradient_sync(self, sync: bool):
        """A micro-batch's forward and backward; `sync` for the step's last. DDP reduces only then
        (`no_sync` before: each replica holds whole gradients anyway). FSDP2 reduce-scatters after
        every micro-batch and adds up the sharded gradients: with its sync off until the last, each
        unit's unsharded gradient would stay on every GPU (Nano-3's: 63 GB in bf16), so accumulation
        costs communication instead of memory, as torchtitan chooses too."""
        if sync or self.mode != "ddp":
            yield
        else:
            with self.student.no_sync():
                yield

    @contextmanager
    def evaluating(self):
        """No-grad forwards of the student in eval mode (held-out evaluation between steps). FSDP2
        keeps the root unit gathered after a forward until its backward (`reshard_after_forward`
        False); forwards with no backward leave it gathered, and the next training step then gave
        the root's parameters (embeddings, final norm, LM head) no gradients. It is freed here."""
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.student.train(was_training)
            if isinstance(self.state_module, FSDPModule):
                self.state_module.reshard()


def resolve_mode(engine: EngineConfig, world: int) -> str:
    """none, ddp or fsdp: the engine `engine` runs as with `world` processes (`EngineConfig.mode`)."""
    return engine.mode(world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DEVICE = "auto"  # EngineConfig.device of this process's run, set by init_process_group


def device_for_rank() -> torch.device:
    """This process's compute device: the engine's `device` (auto: GPU LOCAL_RANK where CUDA is present)."""
    return resolve_device(_DEVICE)


def init_process_group(engine: EngineConfig) -> tuple[str, int, int]:
    """(resolved mode, rank, world). Uses torchrun's env; fsdp/ddp in a plain process get a 1-rank group.
    A worker started by torchrun ends when torchrun does (`launcher.watch_launcher`)."""
    global _DEVICE
    watch_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = resolve_mode(engine, world)
    _DEVICE = engine.device
    if mode == "none":
        if world > 1:
            raise ConfigError(f"parallel 'none' with {world} processes would train {world} unrelated copies; "
                              "use --parallel auto, ddp or fsdp under torchrun")
        return mode, 0, 1
    if not dist.is_initialized():
        device = device_for_rank()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return mode, dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Leave the process group in step: every rank reaches the barrier before any rank destroys
    its group, so no rank tears down gloo pairs a peer is still using."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_json(obj, src: int = 0):
    """`obj` (JSON-able) as rank `src` has it, on every rank; `obj` itself without a process group.
    Collective: every rank calls it (the others' `obj` is ignored)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    device = device_for_rank()  # NCCL broadcasts CUDA tensors only
    data = json.dumps(obj).encode() if dist.get_rank() == src else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(size, src)
    buf = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks (a copy; `t` itself is untouched)."""
    t = t.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def sum_over_ranks(tensors: dict[str, torch.Tensor]) -> None:
    """In place: every tensor becomes its sum over all ranks (same keys and shapes on each rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for key in sorted(tensors):
            t = tensors[key].to(device_for_rank())  # NCCL reduces CUDA tensors only
            dist.all_reduce(t)
            tensors[key].copy_(t)


def _checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Per-block activation checkpointing: the block's forward is recomputed in backward. The
    module tree (and every state-dict key) is unchanged."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _shard(blocks: nn.ModuleList, root: nn.Module, extra_units: list[nn.Module], **kw) -> None:
    for block in blocks:
        fully_shard(block, **kw)
    for unit in extra_units:
        fully_shard(unit, **(kw | {"mp_policy": MixedPrecisionPolicy(torch.float32, torch.float32)}))
    fully_shard(root, **(kw | {"reshard_after_forward": False}))


def _materialise(module: nn.Module, device: torch.device | str, fill) -> None:
    """A module built on the meta device (and sharded, for fsdp) gets storage on `device`, then
    `fill(module)` writes its weights, each rank its own shards (distributed/loading.py)."""
    if fill is None:
        return
    module.to_empty(device=device)
    fill(module)


def _to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """Move every tensor that has storage; meta tensors stay for `_materialise` after sharding."""
    return module._apply(lambda t: t if t.is_meta else t.to(device))


def prepare_teacher(teacher: nn.Module, mode: str, engine: EngineConfig, fill=None) -> nn.Module:
    """The frozen teacher in the compute dtype on this rank's device: for fsdp sharded like the
    student (each block a unit, `reshard_after_forward`). A teacher built on the meta device is
    given storage after sharding and filled by `fill(teacher)` (pass `fill` exactly then)."""
    device = device_for_rank()
    teacher = _to_device(teacher.to(dtype=DTYPES[engine.dtype]), device).eval().requires_grad_(False)
    if mode == "fsdp":
        _shard(teacher.backbone.layers, teacher, [], reshard_after_forward=True)
    _materialise(teacher, device, fill)
    return teacher


def parallelize(step: nn.Module, teacher: nn.Module, mode: str, rank: int, world: int, engine: EngineConfig,
                fill=None) -> Engine:
    """Wrap the student step module (holding `step.elastic`) for `mode`, next to the teacher from
    `prepare_teacher`. With `fill`, `step.elastic.model` was built on the meta device: it is
    materialised after sharding (before DDP, which broadcasts rank 0's weights) and `fill` writes it."""
    device = device_for_rank()
    elastic = step.elastic
    _to_device(step, device)
    if engine.activation_checkpointing:
        _checkpoint_blocks(elastic.model.backbone.layers)
    if mode == "none":
        _materialise(elastic.model, device, fill)
        return Engine(mode, rank, world, device, step, step, teacher)
    if mode == "ddp":
        _materialise(elastic.model, device, fill)
        ids = [device.index] if device.type == "cuda" else None
        # budget 1.0 runs without the router: its parameters are then unused for that step
        ddp = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)
        return Engine(mode, rank, world, device, ddp, step, teacher)
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[engine.dtype], reduce_dtype=torch.float32)
    # pinned host memory speeds up copies to a GPU; without one there is none to pin for
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if engine.optimizer_offload else OffloadPolicy()
    _shard(elastic.model.backbone.layers, step, [elastic.router], mp_policy=mp, offload_policy=offload)
    _materialise(elastic.model, torch.device("cpu") if engine.optimizer_offload else device, fill)  # offload: shards on CPU
    return Engine(mode, rank, world, device, step, step, teacher)


def full_state_dict(module: nn.Module, all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU: on rank 0 only, or on every rank with `all_ranks`."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
    state = get_model_state_dict(module, options=opts)
    return {k: v.detach().cpu() for k, v in state.items()}


def gathered(engine: Engine, module: nn.Module, plain: Callable[[dict[str, torch.Tensor]], nn.Module]):
    """`module` (the engine's state module or one inside it) with whole weights: `module` itself for
    none / ddp (every rank holds them); for fsdp its full state, gathered onto rank 0's CPU, made
    into a plain module by `plain(state)` (keys relative to `module`), and None on the other ranks.
    Collective under fsdp: every rank calls it."""
    if engine.mode != "fsdp":
        return module
    state = full_state_dict(engine.state_module)
    if engine.rank != 0:
        return None
    prefix = next(name for name, m in engine.state_module.named_modules() if m is module)
    prefix = f"{prefix}." if prefix else ""
    return plain({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


def on_full_copy(module: nn.Module, make_plain, fn):
    """`fn(m)` on a plain copy `m = make_plain()` holding `module`'s full state, then the result
    loaded back into `module`: for work outside the training step on a small module (settling the
    budget router). Running it on `module` itself would fire DDP's gradient hooks or FSDP's lazy
    initialisation outside a step. Every rank calls it alike and `fn` runs identically on each."""
    plain = make_plain()
    plain.load_state_dict(full_state_dict(module, all_ranks=True))
    result = fn(plain)
    if isinstance(module, FSDPModule):
        set_model_state_dict(module, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(plain.state_dict())
    return result
