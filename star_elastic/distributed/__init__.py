"""The one place that applies parallelism to models that know nothing of it (see parallel.py)."""

from star_elastic.distributed.config import EngineConfig
from star_elastic.runtime import resolve_device
from star_elastic.distributed.parallel import (
    Engine,
    barrier,
    broadcast_json,
    full_state_dict,
    gathered,
    global_sum,
    init_process_group,
    on_full_copy,
    parallelize,
    prepare_teacher,
    resolve_mode,
    shutdown,
    sum_over_ranks,
)

__all__ = ["Engine", "EngineConfig", "barrier", "broadcast_json", "full_state_dict", "gathered", "global_sum",
           "init_process_group", "on_full_copy", "parallelize", "prepare_teacher", "resolve_device", "resolve_mode",
           "shutdown", "sum_over_ranks"]
