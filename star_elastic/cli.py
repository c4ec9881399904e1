"""`star-elastic` command line: each subcommand is a config dataclass and the function it runs.

The flags are generated from the config's fields (star_elastic/flags.py): one spelling per option,
the field's docstring as its help, the same names as the YAML keys of `--config FILE.yaml` (given
flags override the file). Every subcommand writes progress and logs to standard error, so that a
`--json` result on standard output is one JSON object and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable

from star_elastic.config import ConfigError, from_dict, merge_config
from star_elastic.flags import add_config_flags, config_source, given_flags


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: `config` names its dataclass as "module:Class" (imported only when the
    command is used), `run(cfg)` returns the exit status."""

    name: str
    help: str
    config: str
    run: Callable[[object], int]
    positional: tuple[str, ...] = ()
    flatten: tuple[str, ...] = ()
    """Nested blocks whose fields are flags too (the others are YAML-only)."""

    def config_class(self) -> type:
        module, _, cls = self.config.partition(":")
        return getattr(importlib.import_module(module), cls)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _info(cfg) -> int:
    from star_elastic.accounting import info_command

    return info_command(cfg.path, as_json=cfg.json)


def _plan(cfg) -> int:
    from star_elastic.plan import plan_command

    return plan_command(cfg)


def _prepare_data(cfg) -> int:
    from star_elastic.data.store import prepare_data

    manifest = prepare_data(cfg)
    for source in manifest["sources"]:
        print(f"{source['input']}: {source['samples']:,} samples, {source['tokens']:,} tokens "
              f"({source['loss_tokens']:,} in the loss), weight {source['weight']:.3g}, "
              f"{source['skipped']['count']} records skipped", file=sys.stderr)
    print(f"store: {cfg.out}", file=sys.stderr)
    return 0


def _train_parent(cfg) -> int:
    from star_elastic.config import check_out_dir
    from star_elastic.train.parent import train_parent

    if not cfg.out:
        raise ConfigError("train-parent needs --out DIR (or 'out:' in the YAML config)")
    check_out_dir(cfg.out)
    _, report = train_parent(cfg, cfg.out)
    summary = {k: report[k] for k in ("params", "steps", "train_seconds", "final_loss")}
    summary |= {"test_accuracy": report["test"]["accuracy"], "by_task": report["test"]["by_task"]}
    _print_json(summary)
    return 0


def _on_every_process(recipe, cfg) -> dict:
    """A recipe that every process of a torchrun job runs; they leave the process group together."""
    from star_elastic.distributed import shutdown

    try:
        return recipe(cfg)
    finally:
        shutdown()


def _elastify(cfg) -> int:
    from star_elastic.train.elastify import train

    summary = _on_every_process(train, cfg)  # checks model, out and data before anything is loaded
    if summary["rank"] == 0:
        _print_json(summary["architectures"])
    return 0


def _slice(cfg) -> int:
    from star_elastic.elastic.model import cost_line
    from star_elastic.slicing import slice_command

    result = slice_command(cfg)
    if cfg.json:
        print(json.dumps(result))
    elif cfg.budget is not None:
        print(f"sliced budget {cfg.budget:g} ({result['budget_type']}) → {cfg.out}", file=sys.stderr)
        for key in ("total_params", "active_params"):
            print(f"  {key:14s} {result[key]:>14,}  ({result[key.replace('params', 'fraction')]:.3f} of the parent)")
        print(f"  {cost_line(result)}")
    else:
        for name, r in (result.items() if cfg.arch_file else [("", result)]):
            print(f"sliced {name or 'arch'} ({r['bytes']:,} bytes) → {cfg.out}/{name}", file=sys.stderr)
    return 0


def _generate(cfg) -> int:
    from star_elastic.data.tokenizer import format_prompt
    from star_elastic.infer.budget import open_server

    server = open_server(cfg.run, cfg.arch_file, cfg.device)
    think, answer = cfg.phases.submodels(server.variants)
    tok = server.parent.tokenizer
    prompt = tok.encode(format_prompt(tok, cfg.prompt), add_special_tokens=False)
    sys.stdout.write("<think>")

    def stream(phase: str, row: int, token: int) -> None:
        sys.stdout.write(tok.decode([token], skip_special_tokens=False))
        sys.stdout.flush()

    run = server.generate([prompt], think, answer, cfg.phases.max_think_tokens, cfg.phases.max_answer_tokens,
                          on_token=stream)
    res = run.results[0]
    print()
    forced = " (</think> forced at the cap)" if res.forced_end_of_think else ""
    print(f"think  {_phase_name(think)}: {len(res.think_tokens)} tokens in {run.think_seconds:.3f} s{forced}",
          file=sys.stderr)
    print(f"answer {_phase_name(answer)}: {len(res.answer_tokens)} tokens in {run.answer_seconds:.3f} s",
          file=sys.stderr)
    return 0


def _phase_name(key: float | str) -> str:
    return f"variant {key}" if isinstance(key, str) else f"budget {key:g}"


def _eval(cfg) -> int:
    from pathlib import Path

    from star_elastic.infer.budget import open_server
    from star_elastic.infer.evaluate import BudgetConfig, evaluate_config, headline, load_eval_examples, plot_front, sweep

    server = open_server(cfg.run, cfg.arch_file, cfg.device)
    phases = cfg.phases
    think, answer = phases.submodels(server.variants)
    examples = load_eval_examples(cfg.data, cfg.n_test)
    if cfg.sweep:
        caps = sorted(cfg.sweep, reverse=True)
        points = sweep(server, examples, caps, cfg.batch_size, max_answer_tokens=phases.max_answer_tokens)
        full = server.variants[0]
        parent = next(p for p in points if p["think_budget"] == p["answer_budget"] == full
                      and p["max_think_tokens"] == caps[0])
        if cfg.plot:
            plot_front(points, parent, Path(cfg.plot))
        _print_json({"points": points, "headline": headline(points, parent)})
        return 0
    if phases.think is not None or phases.answer is not None:
        configs = [BudgetConfig(think, answer, phases.max_think_tokens)]
    else:
        configs = [BudgetConfig(b, b, phases.max_think_tokens) for b in server.variants]
    _print_json([evaluate_config(server, examples, c, cfg.batch_size, phases.max_answer_tokens) for c in configs])
    return 0


def _quantize(cfg) -> int:
    from star_elastic.config import check_out_dir
    from star_elastic.quant.qad import quantize_run

    for key, flag in (("run", "RUN"), ("out", "--out QRUN")):
        if not getattr(cfg, key):
            raise ConfigError(f"quantize needs {flag} (or '{key}:' in the YAML config)")
    check_out_dir(cfg.out)
    summary = _on_every_process(quantize_run, cfg)
    if summary.pop("rank") == 0:
        _print_json(summary)
    return 0


def _demo(cfg) -> int:
    from star_elastic.demo import run_demo

    report = run_demo(cfg)
    print(f"report: {cfg.out}/report.md ({report['wall_seconds']} s)")
    return 0


def _serve(cfg) -> int:
    import uvicorn

    from star_elastic.serve.app import app_for

    app = app_for(cfg)
    print(f"serving {cfg.name} on http://{cfg.host}:{cfg.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0


COMMANDS = [
    Command("info", "print a model's pattern, sizes and parameter counts", "star_elastic.accounting:InfoConfig",
            _info, positional=("path",)),
    Command("plan", "per-GPU memory of elastifying MODEL, by part, and whether it fits", "star_elastic.plan:PlanConfig",
            _plan, positional=("model",), flatten=("engine",)),
    Command("train-parent", "train the demo's small reasoning parent on CPU and report its accuracy",
            "star_elastic.train.parent:ParentConfig", _train_parent),
    Command("prepare-data", "tokenize jsonl / parquet files (a mixture: PATH:WEIGHT ...) once into a token store",
            "star_elastic.data.store:PrepareConfig", _prepare_data, positional=("inputs",)),
    Command("elastify", "train one checkpoint holding a nested model for every budget",
            "star_elastic.train.elastify:ElastifyConfig", _elastify, flatten=("elastic", "engine")),
    Command("slice", "cut a submodel out of an elastic run (--budget) or of any sorted checkpoint (--arch)",
            "star_elastic.slicing:SliceConfig", _slice, positional=("run",)),
    Command("generate", "budget-controlled generation: a small model thinks, a larger one answers",
            "star_elastic.infer.budget:GenerateConfig", _generate, positional=("run", "prompt"), flatten=("phases",)),
    Command("eval", "accuracy and latency of budgets and budget-control configurations (JSON)",
            "star_elastic.infer.evaluate:EvalConfig", _eval, positional=("run",), flatten=("phases",)),
    Command("quantize", "FP8 / NVFP4 PTQ and nested QAD of an elastic run", "star_elastic.quant.qad:QuantizeConfig",
            _quantize, positional=("run",), flatten=("quant", "engine")),
    Command("demo", "the whole story on a small reasoning model trained on CPU", "star_elastic.demo:DemoConfig", _demo),
    Command("serve", "OpenAI-compatible HTTP server with per-request think/answer budgets",
            "star_elastic.serve.app:ServeConfig", _serve, positional=("run",), flatten=("phases",)),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand gets its flags (the others' configs are not imported)."""
    parser = argparse.ArgumentParser(prog="star-elastic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.set_defaults(command_spec=cmd)
        if only is None or only == cmd.name:
            p.add_argument("--config", help="YAML file with the same keys as the flags (flags override it)")
            add_config_flags(p, cmd.config_class(), cmd.positional, cmd.flatten)
    return parser


def load_config(cmd: Command, args: argparse.Namespace):
    """The command's config: the YAML file (if any), then the flags given, validated once."""
    data = merge_config(args.config, given_flags(args))
    return from_dict(cmd.config_class(), data, source=config_source(args, cmd.name))


def main(argv: list[str] | None = None) -> int:
    from star_elastic.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only=chosen if any(c.name == chosen for c in COMMANDS) else None).parse_args(argv)
    cmd = args.command_spec
    try:
        return int(cmd.run(load_config(cmd, args)) or 0)
    except (ConfigError, ValueError, OSError) as err:  # bad input or a file system refusal: one line, no traceback
        print(f"star-elastic {cmd.name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
