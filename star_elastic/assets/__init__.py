"""Files shipped inside the package: the demo's converged parent (Hugging Face `nemotron_h` layout).

`PARENT` is its folder: config.json, model.safetensors, tokenizer files, generation_config.json and
train_report.json (the committed configs/parent.yaml it was trained with, its test accuracy, steps,
tokens). `make parent` retrains it and compares (benchmarks/retrain_parent.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PARENT = Path(__file__).resolve().parent / "parent"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
