"""`star-elastic` command line: a thin map from subcommand to library function.

Every subcommand writes progress and logs to standard error, so that a `--json` result on standard
output is one JSON object and nothing else.
"""

from __future__ import annotations

import argparse
import sys

from star_elastic.config import ConfigError


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's pattern, sizes and parameter counts")
    p.add_argument("path", help="model directory (config.json is enough; weights are not read)")
    p.add_argument("--json", action="store_true", help="print one JSON object on standard output")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from star_elastic.accounting import info_command

    return info_command(args.path, as_json=args.json)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_train_parent(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-parent", help="train the demo's small reasoning parent on CPU and report its accuracy")
    p.add_argument("--out", required=True, help="output model directory (Hugging Face nemotron_h layout)")
    p.add_argument("--config", help="YAML with ParentConfig keys (flags override it)")
    for flag, kind in (("steps", int), ("batch-size", int), ("lr", float), ("width-scale", float), ("seed", int),
                       ("n-test", int), ("threads", int)):
        p.add_argument(f"--{flag}", type=kind, default=None)
    p.set_defaults(func=_run_train_parent)


def _run_train_parent(args: argparse.Namespace) -> int:
    import json

    from star_elastic.train.parent import load_parent_config, train_parent

    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "width_scale", "seed", "n_test",
                                                 "threads")}
    cfg = load_parent_config(args.config, overrides)
    _, report = train_parent(cfg, args.out)
    summary = {k: report[k] for k in ("params", "steps", "train_seconds", "final_loss")}
    summary["test_accuracy"] = report["test"]["accuracy"]
    summary["by_task"] = report["test"]["by_task"]
    print(json.dumps(summary, indent=2))
    return 0


def _add_elastify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("elastify", help="train one checkpoint holding a nested model for every budget")
    p.add_argument("--model", help="parent model directory")
    p.add_argument("--data", help='jsonl / parquet (text, messages or input_ids) or "synthetic"')
    p.add_argument("--out", help="run folder")
    p.add_argument("--budgets", type=_floats, help="e.g. 1.0,0.75,0.5")
    p.add_argument("--budget-type", choices=["total_params", "active_params", "memory", "latency"])
    p.add_argument("--budget-mode", choices=["band", "ceiling"],
                   help="band (default): final costs within ±tolerance of the targets; ceiling: never above them")
    p.add_argument("--budget-tolerance", type=float, help="relative tolerance of --budget-mode (default 0.02)")
    p.add_argument("--nested-budgets", action="store_true", default=None,
                   help="a smaller budget's architecture is contained in every larger one's on every axis")
    p.add_argument("--steps", type=int)
    p.add_argument("--seq-len", type=int, help="stage-2 sequence length (stage 1 uses half)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--stop-after", type=int, help="stop after this many steps (checkpointed); resume with --resume")
    p.add_argument("--config", help="YAML with the same keys (flags override it)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from RUN/checkpoints/latest")
    p.set_defaults(func=_run_elastify)


def _run_elastify(args: argparse.Namespace) -> int:
    import json

    from star_elastic.train.elastify import load_elastify_config, train

    overrides = {
        "model": args.model, "data": args.data, "out": args.out, "steps": args.steps, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, "checkpoint_every": args.checkpoint_every, "stop_after": args.stop_after,
        "resume": args.resume, "elastic.budgets": args.budgets, "elastic.budget_type": args.budget_type,
        "elastic.budget_mode": args.budget_mode, "elastic.budget_tolerance": args.budget_tolerance,
        "elastic.nested": args.nested_budgets,
    }
    if args.seq_len:
        overrides["stage2_seq_len"] = args.seq_len
        overrides["stage1_seq_len"] = max(8, args.seq_len // 2)
    cfg = load_elastify_config(args.config, overrides)
    for key in ("model", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"elastify needs --{key} (or '{key}:' in the YAML config)")
    summary = train(cfg)
    if summary["rank"] == 0:
        print(json.dumps(summary["architectures"], indent=2, default=str))
    return 0


def _add_slice(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slice", help="cut one budget out of an elastic run as a standalone checkpoint")
    p.add_argument("run", help="elastic run folder")
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_run_slice)


def _run_slice(args: argparse.Namespace) -> int:
    import json

    from star_elastic.elastic.model import cost_line
    from star_elastic.slicing import slice_run

    result = slice_run(args.run, args.budget, args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"sliced budget {args.budget} ({result['budget_type']}) → {args.out}", file=sys.stderr)
        for key in ("total_params", "active_params"):
            print(f"  {key:14s} {result[key]:>14,}  ({result[key.replace('params', 'fraction')]:.3f} of the parent)")
        print(f"  {cost_line(result)}")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="FP8 / NVFP4 PTQ and nested QAD of an elastic run")
    p.add_argument("run", help="elastic run folder (BF16)")
    p.add_argument("--format", choices=["fp8", "nvfp4"], help="required here or as quant.format in --config")
    p.add_argument("--data", help='jsonl / parquet or "synthetic" (default)')
    p.add_argument("--qad-steps", type=int, help="QAD steps after PTQ (default 0: PTQ only)")
    p.add_argument("--out", help="quantized run folder (QRUN); required here or in --config")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="YAML with QuantizeConfig keys, e.g. configs/quantize_nvfp4.yaml (flags override it)")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    import json

    from star_elastic.config import from_dict, merge_config
    from star_elastic.quant.qad import QuantizeConfig, quantize_run

    data = merge_config(args.config, {
        "run": args.run, "out": args.out, "data": args.data, "qad_steps": args.qad_steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed, "quant.format": args.format,
    })
    quant = data.get("quant") or {}
    if isinstance(quant, dict) and not quant.get("format"):  # a non-mapping is QuantizeConfig's error to name
        raise ConfigError("quantize needs --format fp8|nvfp4 (or 'quant: {format: ...}' in the YAML config)")
    if not data.get("out"):
        raise ConfigError("quantize needs --out QRUN (or 'out:' in the YAML config)")
    summary = quantize_run(from_dict(QuantizeConfig, data, source=args.config or "quantize flags"))
    print(json.dumps(summary, indent=2))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="budget-controlled generation: a small model thinks, a larger one answers")
    p.add_argument("run", help="elastic run folder")
    p.add_argument("prompt", help="user message")
    p.add_argument("--think-budget", type=float, default=1.0)
    p.add_argument("--answer-budget", type=float, default=1.0)
    p.add_argument("--max-think-tokens", type=int, default=256, help="cap; </think> is forced when reached")
    p.add_argument("--max-answer-tokens", type=int, default=64)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from star_elastic.data.tokenizer import format_prompt
    from star_elastic.elastic.run import load_elastic
    from star_elastic.infer.budget import ElasticServer

    elastic = load_elastic(args.run)
    server = ElasticServer.from_elastic(elastic)
    tok = elastic.model.tokenizer
    prompt = tok.encode(format_prompt(tok, args.prompt), add_special_tokens=False)
    sys.stdout.write("<think>")

    def stream(phase: str, row: int, token: int) -> None:
        sys.stdout.write(tok.decode([token], skip_special_tokens=False))
        sys.stdout.flush()

    run = server.generate([prompt], args.think_budget, args.answer_budget, args.max_think_tokens,
                          args.max_answer_tokens, on_token=stream)
    res = run.results[0]
    print()
    forced = " (</think> forced at the cap)" if res.forced_end_of_think else ""
    print(f"think  budget {args.think_budget:g}: {len(res.think_tokens)} tokens in {run.think_seconds:.3f} s{forced}",
          file=sys.stderr)
    print(f"answer budget {args.answer_budget:g}: {len(res.answer_tokens)} tokens in {run.answer_seconds:.3f} s",
          file=sys.stderr)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy and latency of budgets and budget-control configurations (JSON)")
    p.add_argument("run", help="elastic run folder")
    p.add_argument("--data", help="jsonl of {prompt, answer} records (default: the built-in test split)")
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--think-budget", type=float, help="one configuration (default: every budget alone)")
    p.add_argument("--answer-budget", type=float)
    p.add_argument("--max-think-tokens", type=int, default=96)
    p.add_argument("--sweep", type=lambda t: [int(x) for x in t.split(",")], metavar="CAPS",
                   help="budget-control sweep over these think caps, e.g. 96,32,20")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--plot", help="PNG of the accuracy-latency front (with --sweep)")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from star_elastic.elastic.run import load_elastic
    from star_elastic.infer.budget import ElasticServer
    from star_elastic.infer.evaluate import BudgetConfig, evaluate_config, headline, load_eval_examples, plot_front, sweep

    server = ElasticServer.from_elastic(load_elastic(args.run))
    examples = load_eval_examples(args.data, args.n_test)
    budgets = server.elastic.ecfg.budgets
    if args.sweep:
        points = sweep(server, examples, sorted(args.sweep, reverse=True), args.batch_size)
        parent = next(p for p in points if p["think_budget"] == p["answer_budget"] == budgets[0]
                      and p["max_think_tokens"] == max(args.sweep))
        if args.plot:
            from pathlib import Path

            plot_front(points, parent, Path(args.plot))
        print(json.dumps({"points": points, "headline": headline(points, parent)}, indent=2))
        return 0
    if args.think_budget is not None:
        configs = [BudgetConfig(args.think_budget, args.answer_budget or args.think_budget, args.max_think_tokens)]
    else:
        configs = [BudgetConfig(b, b, args.max_think_tokens) for b in budgets]
    print(json.dumps([evaluate_config(server, examples, c, args.batch_size) for c in configs], indent=2))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole story on a small reasoning model trained on CPU")
    p.add_argument("--out", default="demo_out", help="output folder (artifacts found there are reused)")
    p.add_argument("--quick", action="store_true", help="toy sizes, about a minute (used by the tests)")
    p.add_argument("--baselines", action="store_true",
                   help="also train every budget alone: independent, compression at equal tokens, compression to match")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from star_elastic.demo import run_demo

    report = run_demo(args.out, quick=args.quick, baselines=args.baselines)
    print(f"report: {args.out}/report.md ({report['wall_seconds']} s)")
    return 0


SUBCOMMANDS = [_add_info, _add_train_parent, _add_elastify, _add_slice, _add_generate, _add_eval, _add_quantize,
               _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="star-elastic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from star_elastic.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"star-elastic {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
