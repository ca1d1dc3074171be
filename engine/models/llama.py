"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over the paged KV cache.

One implementation: Qwen2 adds a bias to q/k/v, Qwen3 an RMSNorm on q and k per head, Mistral a sliding
window. q/k/v and gate/up are each one fused matmul; the checkpoint's separate matrices are stacked at load.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.layers.attention import PagedAttention
from engine.layers.rotary import cos_sin_cache
from kernels import KernelOps


class RMSNorm(nn.Module):
    def __init__(self, ops: KernelOps, size: int, eps: float) -> None:
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class LlamaAttention(nn.Module):
    def __init__(self, config, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        o_bias = getattr(config, "attention_bias", False) and config.model_type != "qwen3"
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(ops, self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(ops, self.head_dim, config.rms_norm_eps)
        window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.attn = PagedAttention(ops, self.num_heads, self.num_kv_heads, self.head_dim, window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, rope_cache: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        self.ops.rotary_embedding(positions, q, k, rope_cache, True)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, ops: KernelOps) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, ops)
        self.mlp = LlamaMLP(config, ops)
        self.input_layernorm = RMSNorm(ops, config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(ops, config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, rope_cache, kv_cache, meta):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rope_cache, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, ops: KernelOps) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, ops) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(ops, config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, rope_cache, kv_caches, meta) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, rope_cache, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our fused parameter, shard index)
    stacked_params = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config, ops: KernelOps) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, ops)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_cache: torch.Tensor | None = None  # set by make_rope_cache once the model is on its device

    def make_rope_cache(self) -> torch.Tensor:
        head_dim = self.model.layers[0].self_attn.head_dim
        rotary_dim = int(head_dim * getattr(self.config, "partial_rotary_factor", 1.0))
        theta, scaling = _rope_settings(self.config)
        return cos_sin_cache(rotary_dim, self.config.max_position_embeddings, theta, scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden_size]; compute_logits picks the rows that sample."""
        return self.model(input_ids, positions, self.rope_cache, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            for ckpt_name, (fused_name, shard) in self.stacked_params.items():
                if f".{ckpt_name}." in name:
                    name = name.replace(ckpt_name, fused_name)
                    self._load_shard(params[name], tensor, shard)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint has unexpected weight {name!r}")
                params[name].data.copy_(tensor)
            loaded.add(name)
        missing = set(params) - loaded - ({"lm_head.weight"} if self.config.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: int) -> None:
        if param.shape[0] == 2 * tensor.shape[0]:  # gate_up: two equal halves
            sizes = [tensor.shape[0]] * 2
        else:  # qkv: q then k, v of equal size
            kv = self.model.layers[0].self_attn.kv_size
            sizes = [param.shape[0] - 2 * kv, kv, kv]
        start = sum(sizes[:shard])
        param.data[start:start + sizes[shard]].copy_(tensor)


def _rope_settings(config) -> tuple[float, dict | None]:
    """(base, scaling): transformers 5 keeps both in rope_parameters, older versions as attributes."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None) or params
    return theta, scaling if scaling.get("rope_type", scaling.get("type", "default")) != "default" else None
