"""The elastic run folder: one checkpoint that holds every nested model.

    RUN/run.json                 format, version, elastic config, choice space, layer order
    RUN/model/                   the sorted (then trained) shared weights, HF `nemotron_h` + tokenizer
    RUN/router.safetensors       router weights
    RUN/importance.safetensors   importance scores (reused by later runs)
    RUN/latency_table.json       only for budget_type "latency"
    RUN/metrics.jsonl            training log
    RUN/checkpoints/             resumable training state
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from star_elastic.config import ConfigError, ElasticConfig, ModelConfig, from_dict
from star_elastic.elastic.model import ElasticLM
from star_elastic.elastic.router import CostModel, load_latency_table
from star_elastic.elastic.space import ChoiceSpace
from star_elastic.hf import load_model, save_model
from star_elastic.model.hybrid import HybridLM

FORMAT = "star-elastic-run"
VERSION = 1


def run_metadata(elastic: ElasticLM) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "elastic": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(elastic.ecfg).items()},
        "choices": {a: list(c) for a, c in elastic.space.choices.items()},
        "layer_order": list(elastic.space.layer_order),
        "architectures": {str(b): elastic.architecture(b).to_dict() for b in elastic.ecfg.budgets},
        "costs": {str(b): {k: info[k] for k in ("target", "achieved", "budget_type", "budget_mode", "held")}
                  for b, info in ((b, elastic.describe(b)) for b in elastic.ecfg.budgets)},
    }


def save_run(elastic: ElasticLM, run: str | Path, model_dir_name: str = "model") -> None:
    """Write the shared weights, the router and run.json (importance and logs are written by the recipe)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    save_model(elastic.model, run / model_dir_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in elastic.router.state_dict().items()},
              str(run / "router.safetensors"))
    if elastic.cost.latency_table is not None:
        (run / "latency_table.json").write_text(json.dumps(elastic.cost.latency_table, indent=2))
    tmp = run / "run.json.tmp"
    tmp.write_text(json.dumps(run_metadata(elastic), indent=2) + "\n")
    tmp.replace(run / "run.json")


def read_run_metadata(run: Path) -> dict:
    path = run / "run.json"
    if not path.is_file():
        raise ConfigError(f"{run}: not an elastic run folder (no run.json)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ConfigError(
            f"{path}: run folder version {meta.get('version')} is not supported by this star-elastic "
            f"(expects version {VERSION}); re-run elastify with this version"
        )
    return meta


def build_elastic(model: HybridLM, ecfg: ElasticConfig, choices: dict | None, layer_order, latency_table=None) -> ElasticLM:
    if choices is not None:
        ecfg = dataclasses.replace(ecfg, choices={a: list(c) for a, c in choices.items()}, axes=tuple(choices))
    space = ChoiceSpace.build(model.config, ecfg, layer_order)
    return ElasticLM(model, ecfg, space, CostModel(space, ecfg, latency_table))


def load_elastic(run: str | Path, device="cpu", model_dir_name: str = "model") -> ElasticLM:
    """An elastic run folder → ElasticLM (eval mode) with `elastic(ids, budget=b)` and `.architecture(b)`."""
    run = Path(run)
    meta, ecfg = _read_run(run)
    model = load_model(run / model_dir_name, device=device)
    return _with_router(run, meta, ecfg, model).to(device).eval()


def load_router(run: str | Path, model_dir_name: str = "model", model: HybridLM | None = None) -> ElasticLM:
    """The run's router and cost model around `model`, by default a meta-device skeleton of its
    config; reads no model weights.

    Enough for `.architecture(b)` and `.describe(b)` (slicing a budget streams the weights itself);
    the skeleton cannot run."""
    run = Path(run)
    meta, ecfg = _read_run(run)
    if model is None:
        with torch.device("meta"):
            model = HybridLM(ModelConfig.from_json(run / model_dir_name / "config.json"))
    return _with_router(run, meta, ecfg, model).eval()


def _read_run(run: Path) -> tuple[dict, ElasticConfig]:
    meta = read_run_metadata(run)
    return meta, from_dict(ElasticConfig, meta["elastic"], source=str(run / "run.json"))


def _with_router(run: Path, meta: dict, ecfg: ElasticConfig, model: HybridLM) -> ElasticLM:
    """`model` inside the run's elastic wrapper, router weights loaded."""
    table = load_latency_table(run / "latency_table.json") if ecfg.budget_type == "latency" else None
    elastic = build_elastic(model, ecfg, meta["choices"], meta["layer_order"], table)
    try:
        router_state = load_file(str(run / "router.safetensors"))
    except (FileNotFoundError, SafetensorError) as err:
        raise ConfigError(f"{run / 'router.safetensors'}: cannot read router weights ({err})") from None
    elastic.router.load_state_dict(router_state)
    return elastic
