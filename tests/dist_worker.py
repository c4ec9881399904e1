"""Run elastify (or quantize) phases one after another in this process (under torchrun or alone)
and write each phase's summary for this rank as OUT/NAME-rankR.json; a phase may then copy its run folder.

    python tests/dist_worker.py PHASES_JSON OUT      (used by tests/test_distributed.py)
    PHASES_JSON: [{"name": ..., "cfg": {ElastifyConfig keys}, "copy_to": optional folder}, ...]
                 a phase with "kind": "quantize" takes QuantizeConfig keys and runs `quantize_run`
"""

import json
import shutil
import sys
from pathlib import Path

from star_elastic.config import from_dict
from star_elastic.distributed import barrier, shutdown
from star_elastic.quant.qad import QuantizeConfig, quantize_run
from star_elastic.train.elastify import ElastifyConfig, train

for phase in json.loads(sys.argv[1]):
    if phase.get("kind") == "quantize":
        summary = quantize_run(from_dict(QuantizeConfig, phase["cfg"]), log=lambda msg: None)
    else:
        summary = train(from_dict(ElastifyConfig, phase["cfg"]), log=lambda msg: None)
    if summary["rank"] == 0 and phase.get("copy_to"):
        shutil.copytree(phase["cfg"]["out"], phase["copy_to"])
    barrier()
    Path(sys.argv[2], f"{phase['name']}-rank{summary['rank']}.json").write_text(json.dumps(summary, default=str))
shutdown()
