"""Run elastify (or quantize) phases one after another in this process (under torchrun or alone)
and write each phase's summary for this rank as OUT/NAME-rankR.json; a phase may then copy its run folder.

    python tests/dist_worker.py PHASES_JSON OUT      (used by tests/test_distributed.py)
    PHASES_JSON: [{"name": ..., "cfg": {ElastifyConfig keys}, "copy_to": optional folder}, ...]
                 a phase with "kind": "quantize" takes QuantizeConfig keys and runs `quantize_run`;
                 "kind": "gather" takes {"run": RUN} and gathers RUN's model back from ddp and fsdp
"""

import json
import shutil
import sys
from pathlib import Path

from star_elastic.config import from_dict
from star_elastic.distributed import EngineConfig, barrier, gathered, init_process_group, parallelize, shutdown
from star_elastic.elastic.run import load_elastic
from star_elastic.model.hybrid import HybridLM
from star_elastic.quant.qad import QuantizeConfig, quantize_run
from star_elastic.train.distill import DistillStep
from star_elastic.train.elastify import ElastifyConfig, state_digest, train


def gather(cfg: dict) -> dict:
    """Per engine: "self" where `gathered` hands back the module itself, None where this rank gets
    nothing, else the SHA-256 of the plain model it built from the gathered state."""
    _, rank, world = init_process_group(EngineConfig(parallel="fsdp"))
    out = {"rank": rank}
    for mode in ("ddp", "fsdp"):
        elastic = load_elastic(cfg["run"])
        engine = parallelize(DistillStep(elastic), None, mode, rank, world, EngineConfig(parallel=mode))
        got = gathered(engine, elastic.model, lambda state: HybridLM.from_state_dict(elastic.config, state))
        out[mode] = "self" if got is elastic.model else got if got is None else state_digest(got)
    return out


for phase in json.loads(sys.argv[1]):
    if phase.get("kind") == "quantize":
        summary = quantize_run(from_dict(QuantizeConfig, phase["cfg"]), log=lambda msg: None)
    elif phase.get("kind") == "gather":
        summary = gather(phase["cfg"])
    else:
        summary = train(from_dict(ElastifyConfig, phase["cfg"]), log=lambda msg: None)
    if summary["rank"] == 0 and phase.get("copy_to"):
        shutil.copytree(phase["cfg"]["out"], phase["copy_to"])
    barrier()
    Path(sys.argv[2], f"{phase['name']}-rank{summary['rank']}.json").write_text(json.dumps(summary, default=str))
shutdown()
