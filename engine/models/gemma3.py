"""Gemma 3 (text; Gemma3ForCausalLM): Gemma 2 with a Gemma RMSNorm over each head of q and k instead of the
scores' soft cap, and a rope per layer type (local layers: rope_local_base_freq; global: rope_theta with its
scaling), which config.json's rope_parameters holds by layer type. Five local layers to one global by default."""
from __future__ import annotations

from engine.layers.layernorm import GemmaRMSNorm
from engine.models.gemma2 import Gemma2ForCausalLM
from engine.models.llama import LlamaAttention
from kernels import KernelOps


class Gemma3Attention(LlamaAttention):
    def __init__(self, config, ops: KernelOps, layer_idx: int) -> None:
        super().__init__(config, ops, layer_idx, scale=config.query_pre_attn_scalar ** -0.5, qk_norm=GemmaRMSNorm)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    attention_class = Gemma3Attention
