"""Paged attention for one layer: rotate the new query and key, write the new K/V into the cache, then attend over
it."""
from __future__ import annotations

import torch

from engine.attention_metadata import AttentionMetadata
from engine.layers.layernorm import RMSNorm
from kernels import KernelOps


class PagedAttention:
    """scale: the scores' factor (head_dim ** -0.5 unless the model says otherwise, as Gemma's
    query_pre_attn_scalar); sliding_window: each query sees its last sliding_window keys; logits_soft_cap:
    scores capped at +-cap by tanh (Gemma 2); qk_norm: the norms of each head of query and key, applied before the
    rotation (Qwen3, Gemma 3)."""

    def __init__(self, ops: KernelOps, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 qk_norm: tuple[RMSNorm, RMSNorm] | None = None) -> None:
        self.ops = ops
        self.qk_norm = qk_norm
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap

    def __call__(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """query [num_tokens, num_heads, head_dim], key/value [num_tokens, num_kv_heads, head_dim], not yet rotated
        (neox pairs), nor normalised where the layer has per-head norms; cos_sin_cache [max_position, rotary_dim]
        the layer's rope table."""
        # One op (normalises,) rotates and writes: launches fewer per layer than each on its own.
        if self.qk_norm is None:
            self.ops.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin_cache, kv_cache,
                                                   meta.slot_mapping, True)
        else:
            q_norm, k_norm = self.qk_norm
            self.ops.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin_cache, kv_cache,
                                                   meta.slot_mapping, True, q_norm.weight, k_norm.weight, q_norm.eps,
                                                   q_norm.weight_offset)
        # The ops read the batch's whole tables and write their sequences' rows of out: no slices, no copies.
        out = torch.empty_like(query)
        for start, end, max_seq_len in meta.decode_groups:
            self.ops.paged_decode_attention(query, kv_cache, meta.block_tables, meta.seq_lens, start, end,
                                            self.scale, max_seq_len, self.sliding_window, self.logits_soft_cap,
                                            out=out)
        if meta.num_prefills:
            self.ops.prefill_attention(query, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                       meta.num_decodes, meta.num_seqs, self.scale, meta.max_prefill_seq_len,
                                       self.sliding_window, self.logits_soft_cap, out=out)
        return out
