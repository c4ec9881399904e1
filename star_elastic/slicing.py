"""Zero-shot slicing: an Architecture and the full (sorted) weights → a standalone smaller model.

Every tensor of the result is a leading slice of the full model's (per group for grouped heads):
`star_elastic.elastic.arch.slice_state` gathers it with the same index sets the elastic forward
uses for its masks.
"""

from __future__ import annotations

from star_elastic.elastic.arch import Architecture, slice_state
from star_elastic.model.hybrid import HybridLM


def slice_model(model: HybridLM, arch: Architecture) -> HybridLM:
    """A new HybridLM holding copies of the sliced weights (dtype and device kept)."""
    state = slice_state(model.state_dict(), model.config, arch)
    return HybridLM.from_state_dict(arch.model_config(model.config), state, model.tokenizer).eval()


def slice_run(run, budget: float, out) -> dict:
    """`star-elastic slice`: the router's architecture for `budget` → a standalone HF checkpoint.

    A quantized run (QRUN) is cut from its packed tensors without dequantizing.
    """
    from pathlib import Path

    from safetensors.torch import load_file

    from star_elastic.config import QuantConfig
    from star_elastic.elastic.run import load_elastic, read_run_metadata
    from star_elastic.hf import save_model
    from star_elastic.quant.export import quant_metadata, read_quant_config, slice_packed, write_quantized

    elastic = load_elastic(run)
    info = elastic.describe(budget)
    arch = elastic.architecture(budget)
    model_dir = Path(run) / "model"
    quant = read_quant_config(model_dir)
    if quant is None:
        save_model(slice_model(elastic.model, arch), out)
        return info
    fmt = "nvfp4" if quant["quantization"]["quant_algo"] == "NVFP4" else "fp8"
    tensors = load_file(str(model_dir / "model.safetensors"))
    cfg, small = elastic.config, arch.model_config(elastic.config)
    qcfg = QuantConfig(**read_run_metadata(Path(run))["quantization"])  # exclusions named in the slice's numbering
    write_quantized(Path(out), small, slice_packed(tensors, cfg, arch, fmt), quant_metadata(qcfg, small),
                    elastic.model.tokenizer)
    return info | {"quantization": fmt}
