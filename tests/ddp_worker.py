"""Run elastify under torchrun and write this rank's weight digest (used by test_elastify.py)."""

import json
import sys
from pathlib import Path

from star_elastic.config import from_dict
from star_elastic.train.elastify import ElastifyConfig, train

cfg = from_dict(ElastifyConfig, json.loads(sys.argv[1]))
summary = train(cfg, log=lambda msg: None)
Path(sys.argv[2], f"rank{summary['rank']}.json").write_text(json.dumps({"sha": summary["state_sha256"]}))
