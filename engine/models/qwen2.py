"""Qwen2 and Qwen2.5: Llama with biases on q, k and v (none on o), and sliding windows on the layers
config.json's layer_types name (use_sliding_window, max_window_layers)."""
from __future__ import annotations

from engine.models.llama import LlamaAttention, LlamaForCausalLM
from kernels import KernelOps


class Qwen2Attention(LlamaAttention):
    def __init__(self, config, ops: KernelOps, layer_idx: int) -> None:
        super().__init__(config, ops, layer_idx, qkv_bias=True, o_bias=False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen2Attention
