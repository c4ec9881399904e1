"""HybridLM vs transformers' NemotronHForCausalLM on this machine's CPU (or GPU), side by side.

    .venv/bin/python benchmarks/bench_hybrid.py [--device cpu] [--dtype float32] [--json]

Both models hold the same weights (ours is saved, transformers loads it). Prefill: tokens/s of
one forward over a batch of prompts. Decode: tokens/s of cached greedy generation, measured as
(time for N new tokens - time for 1 new token) / (N - 1), so that each side's own generation loop
is included but its prefill is not. Prints the ratios ours / transformers. Both run in one
process with the same allocator settings (`star_elastic.runtime.tune_cpu_allocator`, as the CLI
uses) and the same thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings

import torch

from star_elastic import HybridLM, ModelConfig, load_model, save_model
from star_elastic.infer.generate import GenerationConfig, generate
from star_elastic.runtime import tune_cpu_allocator

BENCH_CONFIG = ModelConfig(
    vocab_size=2048, hidden_size=256, pattern="M*EM-EM*EM", num_attention_heads=8, num_key_value_heads=2,
    head_dim=32, intermediate_size=512, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=64, n_groups=2,
    n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=256, moe_shared_expert_intermediate_size=512,
    chunk_size=64, routed_scaling_factor=2.5,
)


def demo_config() -> ModelConfig:
    from star_elastic.data.tokenizer import build_tokenizer
    from star_elastic.train.parent import DEFAULT_PARENT

    return ModelConfig(**DEFAULT_PARENT, vocab_size=len(build_tokenizer()))


def _once(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds of each function, run in alternation so machine noise hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_once(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--config", choices=["bench", "demo"], default="bench",
                    help="bench: a 10-layer hidden-256 hybrid; demo: the demo's trained parent size")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--default-allocator", action="store_true",
                    help="skip tune_cpu_allocator (it applies to both sides alike: one process)")
    args = ap.parse_args()
    if not args.default_allocator:
        tune_cpu_allocator()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    config = BENCH_CONFIG if args.config == "bench" else demo_config()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(HybridLM(config).init_weights(0), tmp)
        ours = load_model(tmp, dtype=dtype).to(args.device).eval()
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt_len), generator=g).to(args.device)
    prompts = ids.tolist()

    with torch.inference_mode():
        pre = interleaved({"ours": lambda: ours(ids), "ref": lambda: ref(ids, use_cache=False)}, args.repeats)
        prefill_ours, prefill_ref = pre["ours"], pre["ref"]

        def ours_gen(n):
            return lambda: generate(ours, prompts, GenerationConfig(max_new_tokens=n))

        def ref_gen(n):
            return lambda: ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        n = args.new_tokens
        t = interleaved({"ours_n": ours_gen(n), "ours_1": ours_gen(1), "ref_n": ref_gen(n), "ref_1": ref_gen(1)},
                        args.repeats)
        decode_ours = (t["ours_n"] - t["ours_1"]) / (n - 1)
        decode_ref = (t["ref_n"] - t["ref_1"]) / (n - 1)

    tokens = args.batch * args.prompt_len
    result = {
        "config": args.config, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": n,
        "prefill_tok_s": {"star_elastic": tokens / prefill_ours, "transformers": tokens / prefill_ref},
        "decode_tok_s": {"star_elastic": args.batch / decode_ours, "transformers": args.batch / decode_ref},
    }
    result["prefill_ratio"] = result["prefill_tok_s"]["star_elastic"] / result["prefill_tok_s"]["transformers"]
    result["decode_ratio"] = result["decode_tok_s"]["star_elastic"] / result["decode_tok_s"]["transformers"]
    if args.json:
        print(json.dumps(result))
        return
    print(f"config {args.config}: {args.device} {args.dtype}, {result['threads']} threads, batch {args.batch}, prompt {args.prompt_len}, "
          f"{n} new tokens", file=sys.stderr)
    for what in ("prefill", "decode"):
        r = result[f"{what}_tok_s"]
        print(f"{what:8s} star_elastic {r['star_elastic']:10.1f} tok/s   transformers {r['transformers']:10.1f} tok/s"
              f"   ratio {result[f'{what}_ratio']:.2f}x")


if __name__ == "__main__":
    main()
