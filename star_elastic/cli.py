"""`star-elastic` command line: a thin map from subcommand to library function.

Every subcommand writes progress and logs to standard error, so that a `--json` result on standard
output is one JSON object and nothing else.
"""

from __future__ import annotations

import argparse
import sys

from star_elastic.config import BUDGET_MODES, BUDGET_TYPES, ConfigError, check_out_dir


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's pattern, sizes and parameter counts")
    p.add_argument("path", help="model directory (config.json is enough; weights are not read)")
    p.add_argument("--json", action="store_true", help="print one JSON object on standard output")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from star_elastic.accounting import info_command

    return info_command(args.path, as_json=args.json)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of elastifying MODEL, by part, and whether it fits")
    p.add_argument("model", help="model directory (config.json is enough; weights are not read)")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory-gb", type=float, help="GB per GPU (e.g. 80 for an H100); decides 'fits'")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--optimizer-offload", action="store_true")
    p.add_argument("--kd-chunk-tokens", type=int, default=1024)
    p.add_argument("--json", action="store_true", help="print one JSON object on standard output")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from star_elastic.plan import PlanConfig, plan_command

    pc = PlanConfig(gpus=args.gpus, seq_len=args.seq_len, micro_batch=args.micro_batch, dtype=args.dtype,
                    activation_checkpointing=args.activation_checkpointing, optimizer_offload=args.optimizer_offload,
                    kd_chunk_tokens=args.kd_chunk_tokens, gpu_memory_gb=args.gpu_memory_gb)
    return plan_command(args.model, pc, as_json=args.json)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_train_parent(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-parent", help="train the demo's small reasoning parent on CPU and report its accuracy")
    p.add_argument("--out", required=True, help="output model directory (Hugging Face nemotron_h layout)")
    p.add_argument("--config", help="YAML with ParentConfig keys (flags override it)")
    for flag, kind in (("steps", int), ("batch-size", int), ("micro-batch-size", int), ("lr", float),
                       ("width-scale", float), ("seed", int), ("n-test", int), ("threads", int)):
        p.add_argument(f"--{flag}", type=kind, default=None)
    p.set_defaults(func=_run_train_parent)


def _run_train_parent(args: argparse.Namespace) -> int:
    import json

    from star_elastic.train.parent import load_parent_config, train_parent

    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "micro_batch_size", "lr", "width_scale", "seed",
                                                 "n_test", "threads")}
    cfg = load_parent_config(args.config, overrides)
    check_out_dir(args.out)
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
    p.add_argument("--budget-type", choices=list(BUDGET_TYPES))
    p.add_argument("--budget-mode", choices=list(BUDGET_MODES),
                   help="band (default): final costs within ±tolerance of the targets; ceiling: never above them; "
                        "none: not held (the behaviour before; for comparison)")
    p.add_argument("--budget-tolerance", type=float, help="relative tolerance of --budget-mode (default 0.02)")
    p.add_argument("--nested-budgets", action="store_true", default=None,
                   help="a smaller budget's architecture is contained in every larger one's on every axis")
    p.add_argument("--settle-every", type=int,
                   help="project the router's picks onto the budgets' windows every N steps (default 50; "
                        "0: only at the stage boundary and at the end)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seq-len", type=int, help="stage-2 sequence length (stage 1 uses half)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--micro-batch-size", type=int,
                   help="sequences per forward on each process (gradient accumulation, sorted by length)")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--stop-after", type=int, help="stop after this many steps (checkpointed); resume with --resume")
    p.add_argument("--config", help="YAML with the same keys (flags override it)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from RUN/checkpoints/latest")
    _add_engine_flags(p)
    p.add_argument("--gpu-memory-gb", type=float, help="per-GPU memory for the plan check (default: the device's)")
    p.add_argument("--load", choices=["auto", "full", "meta"],
                   help="parent loading: meta = on the meta device, shards filled from the files tensor by tensor "
                        "(auto: meta with fsdp)")
    p.set_defaults(func=_run_elastify)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Parallelism and memory flags (star_elastic.distributed); the same names as the YAML keys."""
    p.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"],
                   help="auto (default): fsdp when torchrun starts more than one process")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16: bf16 compute, fp32 master weights (fsdp)")
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.add_argument("--optimizer-offload", action="store_true", default=None,
                   help="sharded params, grads and optimizer states in CPU memory (fsdp)")


def _run_elastify(args: argparse.Namespace) -> int:
    import json

    from star_elastic.train.elastify import load_elastify_config, train

    overrides = {
        "model": args.model, "data": args.data, "out": args.out, "steps": args.steps, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "lr": args.lr, "seed": args.seed,
        "checkpoint_every": args.checkpoint_every, "stop_after": args.stop_after,
        "resume": args.resume, "elastic.budgets": args.budgets, "elastic.budget_type": args.budget_type,
        "elastic.budget_mode": args.budget_mode, "elastic.budget_tolerance": args.budget_tolerance,
        "elastic.nested": args.nested_budgets, "settle_every": args.settle_every,
        "parallel": args.parallel, "dtype": args.dtype, "activation_checkpointing": args.activation_checkpointing,
        "optimizer_offload": args.optimizer_offload, "gpu_memory_gb": args.gpu_memory_gb, "load": args.load,
    }
    if args.seq_len:
        overrides["stage2_seq_len"] = args.seq_len
        overrides["stage1_seq_len"] = max(8, args.seq_len // 2)
    cfg = load_elastify_config(args.config, overrides)
    for key in ("model", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"elastify needs --{key} (or '{key}:' in the YAML config)")
    check_out_dir(cfg.out)
    from star_elastic.distributed import shutdown

    try:
        summary = train(cfg)
    finally:
        shutdown()
    if summary["rank"] == 0:
        print(json.dumps(summary["architectures"], indent=2, default=str))
    return 0


def _add_slice(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slice", help="cut a submodel out of an elastic run (--budget) or of any sorted checkpoint (--arch)",
        description="RUN --budget B: the router's pick for budget B. CKPT --arch / --arch-file: explicit sizes "
                    "cut from any nemotron_h checkpoint folder (BF16, FP8 or NVFP4), streamed one tensor at a "
                    "time. The checkpoint must already be sorted by importance (every variant a prefix), as "
                    "NVIDIA's Elastic checkpoints and our runs are.")
    p.add_argument("run", metavar="RUN_OR_CKPT", help="elastic run folder, or a nemotron_h checkpoint folder")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--budget", type=float, help="budget of the run's router")
    how.add_argument("--arch", help="per-axis sizes, e.g. hidden=2048,mamba_heads=6,experts=96,layers=0-23+26; "
                                    "axes: hidden, attn_heads (per KV group), mamba_heads (per SSM group), experts, "
                                    "expert_inter, shared_inter, mlp_inter, layers; unnamed axes stay full")
    how.add_argument("--arch-file", help='JSON {"23b": {"hidden": 2048, ...}, "12b": "hidden=1536,..."}: '
                                         "one folder per name under --out")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="output shard size for --arch (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_run_slice)


def _run_slice(args: argparse.Namespace) -> int:
    import json

    from star_elastic.elastic.model import cost_line
    from star_elastic.slicing import slice_run

    if args.max_shard_gb <= 0:
        raise ConfigError(f"--max-shard-gb {args.max_shard_gb}: must be positive")
    if args.budget is None:
        return _run_slice_arch(args)
    check_out_dir(args.out, empty=True)
    result = slice_run(args.run, args.budget, args.out, int(args.max_shard_gb * 2**30))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"sliced budget {args.budget} ({result['budget_type']}) → {args.out}", file=sys.stderr)
        for key in ("total_params", "active_params"):
            print(f"  {key:14s} {result[key]:>14,}  ({result[key.replace('params', 'fraction')]:.3f} of the parent)")
        print(f"  {cost_line(result)}")
    return 0


def _run_slice_arch(args: argparse.Namespace) -> int:
    import json

    from star_elastic.slicing import checkpoint_dir, read_archs, slice_checkpoint

    ckpt = checkpoint_dir(args.run)
    archs = read_archs(ckpt, args.arch, args.arch_file)
    result = slice_checkpoint(ckpt, archs, args.out, int(args.max_shard_gb * 2**30))
    if args.json:
        print(json.dumps(result))
    else:
        for name, r in (result.items() if args.arch_file else [("", result)]):
            print(f"sliced {name or 'arch'} ({r['bytes']:,} bytes) → {args.out}/{name}", file=sys.stderr)
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="FP8 / NVFP4 PTQ and nested QAD of an elastic run")
    p.add_argument("run", help="elastic run folder (BF16)")
    p.add_argument("--format", choices=["fp8", "nvfp4"], help="required here or as quant.format in --config")
    p.add_argument("--data", help='jsonl / parquet or "synthetic" (default)')
    p.add_argument("--qad-steps", type=int, help="QAD steps after PTQ (default 0: PTQ only)")
    p.add_argument("--out", help="quantized run folder (QRUN); required here or in --config")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--micro-batch-size", type=int,
                   help="sequences per forward on each process (gradient accumulation, sorted by length)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="YAML with QuantizeConfig keys, e.g. configs/quantize_nvfp4.yaml (flags override it)")
    _add_engine_flags(p)
    p.set_defaults(func=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    import json

    from star_elastic.config import from_dict, merge_config
    from star_elastic.quant.qad import QuantizeConfig, quantize_run

    data = merge_config(args.config, {
        "run": args.run, "out": args.out, "data": args.data, "qad_steps": args.qad_steps, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
        "quant.format": args.format,
        "parallel": args.parallel, "dtype": args.dtype, "activation_checkpointing": args.activation_checkpointing,
        "optimizer_offload": args.optimizer_offload,
    })
    quant = data.get("quant") or {}
    if isinstance(quant, dict) and not quant.get("format"):  # a non-mapping is QuantizeConfig's error to name
        raise ConfigError("quantize needs --format fp8|nvfp4 (or 'quant: {format: ...}' in the YAML config)")
    if not data.get("out"):
        raise ConfigError("quantize needs --out QRUN (or 'out:' in the YAML config)")
    check_out_dir(str(data["out"]))
    from star_elastic.distributed import shutdown

    try:
        summary = quantize_run(from_dict(QuantizeConfig, data, source=args.config or "quantize flags"))
    finally:
        shutdown()
    if summary.pop("rank") == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="budget-controlled generation: a small model thinks, a larger one answers")
    p.add_argument("run", metavar="RUN_OR_CKPT", help="elastic run folder, or a sorted checkpoint with --arch-file")
    p.add_argument("prompt", help="user message")
    p.add_argument("--think-budget", type=float, default=1.0)
    p.add_argument("--answer-budget", type=float, default=1.0)
    _add_variant_flags(p)
    p.add_argument("--max-think-tokens", type=int, default=256, help="cap; </think> is forced when reached")
    p.add_argument("--max-answer-tokens", type=int, default=64)
    p.set_defaults(func=_run_generate)


def _add_variant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch-file", help='explicit architectures instead of the router: JSON {"12b": {"hidden": 1536, '
                                       '...}, ...} (as for slice); "full" is always available')
    p.add_argument("--think-variant", help="variant of --arch-file that writes the <think> trace (default full)")
    p.add_argument("--answer-variant", help="variant of --arch-file that writes the answer (default full)")


def _server_and_phases(args: argparse.Namespace):
    """(ElasticServer, think key, answer key): router budgets, or variant names with --arch-file."""
    from star_elastic.infer.budget import ElasticServer
    from star_elastic.slicing import checkpoint_dir, read_archs

    if args.arch_file is None:
        if args.think_variant or args.answer_variant:
            raise ConfigError("--think-variant / --answer-variant name variants of --arch-file; give --arch-file")
        from star_elastic.elastic.run import load_elastic

        return ElasticServer.from_elastic(load_elastic(args.run)), args.think_budget, args.answer_budget
    ckpt = checkpoint_dir(args.run)
    server = ElasticServer.from_checkpoint(ckpt, read_archs(ckpt, None, args.arch_file))
    think, answer = args.think_variant or "full", args.answer_variant or "full"
    for key in (think, answer):
        server.architecture(key)  # an unknown name is an error before any work
    return server, think, answer


def _run_generate(args: argparse.Namespace) -> int:
    from star_elastic.data.tokenizer import format_prompt

    server, think, answer = _server_and_phases(args)
    tok = server.parent.tokenizer
    prompt = tok.encode(format_prompt(tok, args.prompt), add_special_tokens=False)
    sys.stdout.write("<think>")

    def stream(phase: str, row: int, token: int) -> None:
        sys.stdout.write(tok.decode([token], skip_special_tokens=False))
        sys.stdout.flush()

    run = server.generate([prompt], think, answer, args.max_think_tokens, args.max_answer_tokens, on_token=stream)
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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy and latency of budgets and budget-control configurations (JSON)")
    p.add_argument("run", metavar="RUN_OR_CKPT", help="elastic run folder, or a sorted checkpoint with --arch-file")
    p.add_argument("--data", help="jsonl of {prompt, answer} records (default: the built-in test split)")
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--think-budget", type=float, help="one configuration (default: every budget alone)")
    p.add_argument("--answer-budget", type=float)
    _add_variant_flags(p)
    p.add_argument("--max-think-tokens", type=int, default=96)
    p.add_argument("--sweep", type=lambda t: [int(x) for x in t.split(",")], metavar="CAPS",
                   help="budget-control sweep over these think caps, e.g. 96,32,20")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--plot", help="PNG of the accuracy-latency front (with --sweep)")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from star_elastic.infer.evaluate import BudgetConfig, evaluate_config, headline, load_eval_examples, plot_front, sweep

    think_given = args.think_budget is not None or args.think_variant is not None
    answer_given = args.answer_budget is not None or args.answer_variant is not None
    server, think, answer = _server_and_phases(args)
    examples = load_eval_examples(args.data, args.n_test)
    variants = server.variants
    if args.sweep:
        points = sweep(server, examples, sorted(args.sweep, reverse=True), args.batch_size)
        parent = next(p for p in points if p["think_budget"] == p["answer_budget"] == variants[0]
                      and p["max_think_tokens"] == max(args.sweep))
        if args.plot:
            from pathlib import Path

            plot_front(points, parent, Path(args.plot))
        print(json.dumps({"points": points, "headline": headline(points, parent)}, indent=2))
        return 0
    if think_given:
        configs = [BudgetConfig(think, answer if answer_given else think, args.max_think_tokens)]
    else:
        configs = [BudgetConfig(b, b, args.max_think_tokens) for b in variants]
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

    check_out_dir(args.out)
    report = run_demo(args.out, quick=args.quick, baselines=args.baselines)
    print(f"report: {args.out}/report.md ({report['wall_seconds']} s)")
    return 0


def _budget_or_variant(text: str) -> float | str:
    """A router budget (a number) or the name of an --arch-file variant."""
    try:
        return float(text)
    except ValueError:
        return text


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with per-request think/answer budgets")
    p.add_argument("run", nargs="?", help="elastic run folder, or a sorted checkpoint with --arch-file (with the "
                                          "backend flags: only its tokenizer is read)")
    p.add_argument("--config", help="YAML with ServeConfig keys (flags override it)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int)
    p.add_argument("--name", help="model id (default: the run folder's name)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 routes")
    p.add_argument("--arch-file", help='serve a sorted checkpoint (no router) with named architectures: JSON '
                                       '{"12b": {"hidden": 1536, ...}, ...} as for slice; "full" is always there')
    p.add_argument("--think-budget", type=_budget_or_variant,
                   help="default think budget, or a variant name with --arch-file (default: the largest)")
    p.add_argument("--answer-budget", type=_budget_or_variant,
                   help="default answer budget, or a variant name with --arch-file (default: the largest)")
    p.add_argument("--max-think-tokens", type=int, help="default trace cap (</think> forced there), 256")
    p.add_argument("--max-tokens", type=int, help="default answer cap, 64")
    p.add_argument("--max-batch", type=int, help="requests decoding at once over all budgets, 32")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 suits small models "
                                                "on a shared CPU)")
    p.add_argument("--think-backend", metavar="URL[#model]", help="proxy: run the think phase on this server")
    p.add_argument("--answer-backend", metavar="URL[#model]", help="proxy: run the answer phase on this server")
    p.add_argument("--backend-api-key", help="Bearer key sent to the backends")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from star_elastic.config import from_dict, merge_config
    from star_elastic.serve.app import ServeConfig, make_local_app, make_proxy_app
    from star_elastic.slicing import checkpoint_dir

    keys = ("host", "port", "name", "api_key", "think_budget", "answer_budget", "max_think_tokens", "max_tokens",
            "max_batch", "threads")
    data = merge_config(args.config, {k: getattr(args, k) for k in keys})
    if args.run and "name" not in data:
        data["name"] = Path(args.run).resolve().name
    cfg = from_dict(ServeConfig, data, source=args.config or "serve flags")
    proxy = args.think_backend or args.answer_backend
    if proxy:
        if not (args.think_backend and args.answer_backend and args.run):
            raise ConfigError("serve: a proxy needs --think-backend, --answer-backend and RUN (for its tokenizer)")
        from transformers import AutoTokenizer

        model_dir = checkpoint_dir(args.run)
        if not (model_dir / "tokenizer.json").is_file():
            raise ConfigError(f"serve: {model_dir} has no tokenizer.json (the proxy formats prompts with it)")
        app = make_proxy_app(args.think_backend, args.answer_backend, AutoTokenizer.from_pretrained(str(model_dir)),
                             cfg, args.backend_api_key)
    else:
        if not args.run:
            raise ConfigError("serve: give an elastic run folder (or --think-backend and --answer-backend)")
        import torch

        from star_elastic.elastic.run import load_elastic
        from star_elastic.infer.budget import ElasticServer
        from star_elastic.slicing import read_archs

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.arch_file:
            ckpt = checkpoint_dir(args.run)
            server = ElasticServer.from_checkpoint(ckpt, read_archs(ckpt, None, args.arch_file), device=device)
        else:
            server = ElasticServer.from_elastic(load_elastic(args.run, device=device))
        app = make_local_app(server, cfg)
    print(f"serving {cfg.name} on http://{cfg.host}:{cfg.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0


SUBCOMMANDS = [_add_info, _add_plan, _add_train_parent, _add_elastify, _add_slice, _add_generate, _add_eval,
               _add_quantize, _add_demo, _add_serve]


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
    except (ConfigError, ValueError, OSError) as err:  # bad input or a file system refusal: one line, no traceback
        print(f"star-elastic {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
