"""One FSDP2 step of the packed distillation check (tests/test_packed.py), per process:

    torchrun --standalone --nproc-per-node 2 tests/packed_worker.py OUT

Process r runs packed row r (student and teacher FSDP2-sharded, each block checkpointed), writes
its (KL sum, CE sum) as OUT/sums-r.json; rank 0 writes the gathered gradients as OUT/grads.safetensors.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file
from test_packed import distill_loss, distill_setup

from star_elastic.distributed import EngineConfig, init_process_group, parallelize, prepare_teacher, shutdown
from star_elastic.train.distill import DistillStep

ENGINE = EngineConfig(parallel="fsdp", activation_checkpointing=True)
mode, rank, world = init_process_group(ENGINE)
elastic, teacher, ids, seq_idx, lm_mask = distill_setup()
engine = parallelize(DistillStep(elastic, chunk_tokens=16), prepare_teacher(teacher, mode, ENGINE), mode, rank, world,
                     ENGINE)
row = slice(rank, rank + 1)
sums = distill_loss(engine, ids[row], seq_idx[row], lm_mask[row])
sums.sum().backward()
grads = {n: p.grad.full_tensor() for n, p in engine.state_module.named_parameters() if p.grad is not None}
Path(sys.argv[1], f"sums-{rank}.json").write_text(json.dumps(sums.detach().tolist()))
if rank == 0:
    save_file({k: v.contiguous() for k, v in grads.items()}, Path(sys.argv[1], "grads.safetensors"))
shutdown()
