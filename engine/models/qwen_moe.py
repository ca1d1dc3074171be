"""Qwen2-MoE and Qwen3-MoE: Qwen2's and Qwen3's attention with a mixture of experts for the MLP (renormalized
when config.json's norm_topk_prob says so), and for Qwen2-MoE a shared expert every token takes, scaled by a
sigmoid gate. Every layer is sparse: configs that make some layers dense (mlp_only_layers,
decoder_sparse_step > 1) are refused."""
from __future__ import annotations

from engine.layers.moe import FusedMoE
from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.qwen3 import Qwen3ForCausalLM
from kernels import KernelOps


class QwenMoE(FusedMoE):
    def __init__(self, config, ops: KernelOps) -> None:
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise ValueError("mixture-of-experts configs with dense layers (mlp_only_layers, decoder_sparse_step) "
                             "are not supported")
        super().__init__(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                         config.moe_intermediate_size, renormalize=config.norm_topk_prob, ops=ops,
                         shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", None))


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    mlp_class = QwenMoE


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    mlp_class = QwenMoE
