"""Qwen3: Llama with an RMSNorm over each head of q and k before the rotation (and no q/k/v bias)."""
from __future__ import annotations

from engine.layers.layernorm import RMSNorm
from engine.models.llama import LlamaAttention, LlamaForCausalLM
from kernels import KernelOps


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, ops: KernelOps, layer_idx: int) -> None:
        super().__init__(config, ops, layer_idx, qk_norm=RMSNorm)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen3Attention
