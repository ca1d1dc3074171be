"""OLMoE: Llama's attention with RMSNorms over all of q's heads together and all of k's (not per head) before
the rotation, and a mixture of experts for the MLP (renormalized per config.json's norm_topk_prob)."""
from __future__ import annotations

from engine.layers.layernorm import RMSNorm
from engine.layers.moe import FusedMoE
from engine.models.llama import LlamaAttention, LlamaForCausalLM
from kernels import KernelOps


class OlmoeAttention(LlamaAttention):
    def __init__(self, config, ops: KernelOps, layer_idx: int) -> None:
        if getattr(config, "clip_qkv", None) is not None:
            raise ValueError("OLMoE's clip_qkv is not supported")
        super().__init__(config, ops, layer_idx, qk_norm=RMSNorm, qk_norm_per_head=False)
        if self.num_heads != config.num_attention_heads:
            # The norms' variance spans every head: split over ranks it would need an all-reduce.
            raise ValueError("OLMoE's q/k norms span every head: tensor_parallel_size must be 1")


class OlmoeMoE(FusedMoE):
    def __init__(self, config, ops: KernelOps) -> None:
        super().__init__(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                         config.intermediate_size, renormalize=config.norm_topk_prob, ops=ops)


class OlmoeForCausalLM(LlamaForCausalLM):
    attention_class = OlmoeAttention
    mlp_class = OlmoeMoE
