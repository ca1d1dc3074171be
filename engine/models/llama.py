"""Llama 3.x over the paged KV cache; also Mistral (registered as Llama, as vLLM does: its one difference, a
sliding window, comes from config.json).

These classes are the decoder every dense family builds on: a family file subclasses what differs (the
attention's biases, scale, soft cap or q/k norm; the decoder layer's norms; the embedding) and names it in its
causal LM's class attributes `attention_class`, `mlp_class`, `decoder_layer_class` and `model_class`. A
mixture-of-experts family sets `mlp_class` to a block over `FusedMoE`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.layers.activation import act_and_mul_op
from engine.layers.attention import PagedAttention
from engine.layers.layernorm import RMSNorm
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.rotary import cos_sin_cache, rope_layer_types, rope_parameters
from engine.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from engine.models.weight_loading import StackedParams, load_weights
from kernels import KernelOps


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_type(config, layer_idx: int) -> str | None:
    """"full_attention" or "sliding_attention" where config.json lists a type per layer (Qwen2, Gemma)."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types[layer_idx] if layer_types else None


def sliding_window(config, layer_idx: int) -> int | None:
    """The layer's window: per layer type where config.json lists them, else one for all layers (Mistral, Phi-3)."""
    kind = layer_type(config, layer_idx)
    if kind is not None:
        return config.sliding_window if kind == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


class LlamaAttention(nn.Module):
    def __init__(self, config, ops: KernelOps, layer_idx: int, *, qkv_bias: bool | None = None,
                 o_bias: bool | None = None, scale: float | None = None, logits_soft_cap: float | None = None,
                 qk_norm: type[RMSNorm] | None = None, qk_norm_per_head: bool = True) -> None:
        """The keywords are what families change; by default biases follow config.attention_bias and the scale
        is head_dim ** -0.5. qk_norm: a norm over each head of q and k, before the rotation (Qwen3, Gemma 3), or
        with qk_norm_per_head False over all of q's heads together and all of k's (OLMoE)."""
        super().__init__()
        self.ops = ops
        self.head_dim = head_dim(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(ops, config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias if qkv_bias is None else qkv_bias)
        # This rank's heads: all of them on one rank.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(ops, config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=bias if o_bias is None else o_bias)
        self.q_norm = self.k_norm = None
        self.qk_norm_per_head = qk_norm_per_head
        if qk_norm is not None:
            q_width, k_width = (self.head_dim, self.head_dim) if qk_norm_per_head else (self.q_size, self.kv_size)
            self.q_norm = qk_norm(ops, q_width, config.rms_norm_eps)
            self.k_norm = qk_norm(ops, k_width, config.rms_norm_eps)
        kind = layer_type(config, layer_idx)
        ropes = rope_layer_types(config)
        self.rope_index = ropes.index(kind if kind in ropes else None)
        # Per-head norms go in with the rotation and the KV write: one pass over the heads in qkv.
        per_head_norms = (self.q_norm, self.k_norm) if qk_norm is not None and qk_norm_per_head else None
        self.attn = PagedAttention(ops, self.num_heads, self.num_kv_heads, self.head_dim,
                                   self.head_dim ** -0.5 if scale is None else scale,
                                   sliding_window(config, layer_idx), logits_soft_cap, per_head_norms)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, rope_cache: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden)
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.attn(positions, q, k, v, rope_cache[self.rope_index], kv_cache, meta)
        return self.o_proj(out.view(-1, self.q_size))


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up in one matmul; act is config.json's (SiLU, or GELU for Gemma)."""

    def __init__(self, config, ops: KernelOps) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(ops, config.hidden_size, [config.intermediate_size] * 2, bias)
        self.down_proj = RowParallelLinear(ops, config.intermediate_size, config.hidden_size, bias=bias)
        self.ops = ops
        self.act_and_mul = act_and_mul_op(getattr(config, "hidden_activation", None) or config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(getattr(self.ops, self.act_and_mul)(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, config, ops: KernelOps, layer_idx: int, attention_class: type[nn.Module],
                 mlp_class: type[nn.Module]) -> None:
        super().__init__()
        self.self_attn = attention_class(config, ops, layer_idx)
        self.mlp = mlp_class(config, ops)
        self.input_layernorm = self.norm_class(ops, config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = self.norm_class(ops, config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                rope_cache: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual): the residual add is fused into the next norm."""
        hidden, residual = self.attend(positions, hidden, residual, rope_cache, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def attend(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
               rope_cache: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output, residual): the previous layer's output added to the residual and normed first."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn(positions, hidden, rope_cache, kv_cache, meta), residual


class LlamaModel(nn.Module):
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, config, ops: KernelOps, make_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(ops, config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = self.norm_class(ops, config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, rope_cache, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    attention_class: type[nn.Module] = LlamaAttention
    mlp_class: type[nn.Module] = LlamaMLP
    decoder_layer_class: type[nn.Module] = LlamaDecoderLayer
    model_class: type[nn.Module] = LlamaModel
    # (our parameter, checkpoint part, shard id): q/k/v and gate/up are stored apart, computed in one matmul each
    stacked_params: StackedParams = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
                                     ("qkv_proj", "v_proj", "v"), ("gate_up_proj", "gate_proj", 0),
                                     ("gate_up_proj", "up_proj", 1)]
    checkpoint_renames: dict[str, str] = {}  # checkpoint module names to ours, where they differ

    def __init__(self, config, ops: KernelOps) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_class(config, ops, lambda i: self.decoder_layer_class(
            config, ops, i, self.attention_class, self.mlp_class))
        self.lm_head = ParallelLMHead(ops, config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_soft_cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2
        self.rope_cache: torch.Tensor | None = None  # set by make_rope_cache once the model is on its device

    def make_rope_cache(self) -> torch.Tensor:
        """[rope kinds, max_position, rotary_dim] fp32: one cos/sin table per rope of the model (Gemma 3 has one
        for its global layers, one for its local ones; every other family one); each layer picks its own."""
        return torch.stack([cos_sin_cache(rope_parameters(self.config, kind), head_dim(self.config),
                                          self.config.max_position_embeddings)
                            for kind in rope_layer_types(self.config)])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden_size]; compute_logits picks the rows that sample."""
        return self.model(input_ids, positions, self.rope_cache, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.logits_soft_cap is not None:
            logits = torch.tanh(logits / self.logits_soft_cap) * self.logits_soft_cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, self.stacked_params, self.config.tie_word_embeddings, self.checkpoint_renames)
