"""Non-gated relu² experts for vLLM's CPU MoE, and the two hooks that let vLLM pick them.

Imported only when the plugin is active (it imports vLLM). Shapes in `apply`: hidden_states (T, H);
w1 (E, I, H) (the up projection alone: one shard, no gate); w2 (E, H, I); topk_ids / topk_weights
(T, K); output (T, H), already weighted and summed over the K experts of each token (vLLM's
finalize step is a no-op for this kernel).
"""

import torch
from vllm.model_executor.layers.fused_moe import config as moe_config_module
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
from vllm.model_executor.layers.fused_moe.oracle import unquantized as oracle
from vllm.platforms import current_platform

RELU2 = MoEActivation.RELU2_NO_MUL


class Relu2Experts(CPUUnquantizedExperts):
    """Each expert applied to the rows routed to it, in the weights' dtype, summed in fp32."""

    @staticmethod
    def is_supported_config(cls, moe_config, weight_key, activation_key, activation_format):
        # vLLM's generic checks only: the grouped-GEMM alignment and zentorch probes of the parent
        # concern its packed kernels, which this class does not use
        return mk.FusedMoEExperts.is_supported_config(cls, moe_config, weight_key, activation_key, activation_format)

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return True

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == RELU2

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """The checkpoint's layout is what `apply` reads: no padding, no prepacking."""
        self._use_zentorch = False

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input):
        # with apply_router_weight_on_input vLLM's prepare step has already scaled hidden_states
        local_ids = topk_ids if expert_map is None else expert_map[topk_ids]  # (T, K); -1: another rank's expert
        total = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
        for e in range(w1.shape[0]):
            rows, slots = torch.nonzero(local_ids == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            up = hidden_states[rows] @ w1[e].T  # (n, I)
            if self.w1_bias is not None:
                up = up + self.w1_bias[e]
            down = torch.relu(up).square() @ w2[e].T  # (n, H)
            if self.w2_bias is not None:
                down = down + self.w2_bias[e]
            weight = 1.0 if apply_router_weight_on_input else topk_weights[rows, slots, None].float()
            total.index_add_(0, rows, down.float() * weight)
        output.copy_(total)


def _let_relu2_config_through() -> None:
    """FusedMoEConfig's last check refuses non-gated experts off CUDA/XPU/ROCm; skip it for relu² on CPU."""
    checked = moe_config_module.FusedMoEConfig.__post_init__

    def post_init(self, *args, **kwargs):
        try:
            checked(self, *args, **kwargs)
        except NotImplementedError as err:
            if not (current_platform.is_cpu() and self.activation == RELU2 and "is_act_and_mul=False" in str(err)):
                raise

    moe_config_module.FusedMoEConfig.__post_init__ = post_init


def _offer_relu2_experts_first() -> None:
    """The CPU backend's kernel list, with Relu2Experts ahead (it declines every other activation)."""
    kernels_of = oracle.backend_to_kernel_cls

    def with_relu2(backend):
        kernels = kernels_of(backend)
        return [Relu2Experts, *kernels] if backend == oracle.UnquantizedMoeBackend.CPU else kernels

    oracle.backend_to_kernel_cls = with_relu2


def install() -> None:
    """Idempotent: vLLM may load general plugins more than once in a process."""
    if getattr(moe_config_module, "_star_elastic_relu2", False):
        return
    _let_relu2_config_through()
    _offer_relu2_experts_first()
    moe_config_module._star_elastic_relu2 = True
    print("[star_elastic_vllm_cpu] relu² experts enabled for vLLM's CPU MoE (make interop only)", flush=True)
