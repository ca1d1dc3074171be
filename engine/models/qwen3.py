"""Qwen3: Llama with an RMSNorm over each head of q and k before the rotation (and no q/k/v bias)."""
from __future__ import annotations

from engine.layers.layernorm import RMSNorm
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from kernels import KernelOps


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, ops: KernelOps, layer_idx: int) -> None:
        super().__init__(config, ops, layer_idx, qk_norm=RMSNorm)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3Model(LlamaModel):
    decoder_layer_class = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_class = Qwen3Model
