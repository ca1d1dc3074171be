"""Gemma 2: Llama's decoder with

- embeddings scaled by sqrt(hidden_size) (rounded to the model's dtype, as transformers does);
- RMSNorm as x * (1 + weight), and four norms per layer: before and after attention, before and after the MLP;
- a GeGLU MLP (config.json's gelu_pytorch_tanh);
- scores scaled by query_pre_attn_scalar ** -0.5 and soft-capped (attn_logit_softcapping), final logits
  soft-capped too (final_logit_softcapping, in LlamaForCausalLM);
- local (sliding-window) and global layers alternating as config.json's layer_types says.
"""
from __future__ import annotations

import torch

from engine.attention_metadata import AttentionMetadata
from engine.layers.layernorm import GemmaRMSNorm
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from kernels import KernelOps


class Gemma2Attention(LlamaAttention):
    def __init__(self, config, ops: KernelOps, layer_idx: int) -> None:
        super().__init__(config, ops, layer_idx, scale=config.query_pre_attn_scalar ** -0.5,
                         logits_soft_cap=config.attn_logit_softcapping)


class Gemma2DecoderLayer(LlamaDecoderLayer):
    norm_class = GemmaRMSNorm

    def __init__(self, config, ops: KernelOps, *layer_args) -> None:
        """layer_args: LlamaDecoderLayer's (layer_idx, attention_class, mlp_class)."""
        super().__init__(config, ops, *layer_args)
        self.pre_feedforward_layernorm = self.norm_class(ops, config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = self.norm_class(ops, config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                rope_cache: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Each block's output is normed before it joins the residual: the add fuses into the next pre-norm."""
        hidden, residual = self.attend(positions, hidden, residual, rope_cache, kv_cache, meta)
        hidden, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(hidden), residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2Model(LlamaModel):
    norm_class = GemmaRMSNorm

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.embed_tokens(input_ids)
        # sqrt(hidden_size) rounded to the embeddings' dtype first (60.0, not 59.87, in bf16 for Gemma-2-9B).
        normalizer = float(torch.tensor(self.embed_tokens.embedding_dim ** 0.5, dtype=embeddings.dtype))
        return embeddings * normalizer


class Gemma2ForCausalLM(LlamaForCausalLM):
    attention_class = Gemma2Attention
    decoder_layer_class = Gemma2DecoderLayer
    model_class = Gemma2Model
