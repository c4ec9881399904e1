"""A vLLM general plugin for `make interop`: Nemotron-H's MoE on vLLM's CPU build.

Nemotron-H's routed experts are non-gated relu² MLPs (`down(relu(up(x))²)`). vLLM 0.32's CPU build
refuses them twice: `FusedMoEConfig` raises "is_act_and_mul=False is supported only for CUDA, XPU and
ROCm", and none of its CPU experts kernels accepts the activation. With STAR_ELASTIC_VLLM_RELU2=1
this plugin lets the config through for that activation only and puts `Relu2Experts` (plain PyTorch,
`relu2.py`) first among the CPU unquantized kernels; every other activation and platform is left to
vLLM. Without the variable it does nothing. It exists so that our checkpoints can be compared with
vLLM on a machine without a GPU; it is not a serving path.
"""

import os

ENV = "STAR_ELASTIC_VLLM_RELU2"


def register() -> None:
    """vLLM calls this in every process it starts (entry point group `vllm.general_plugins`)."""
    if os.environ.get(ENV) != "1":
        return
    from . import relu2

    relu2.install()
