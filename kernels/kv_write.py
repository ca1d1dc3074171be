"""Scatter each token's key and value into its paged-cache slot (one program per token)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_kv_heads, head_dim,
                     stride_k_tok, stride_k_head, stride_v_tok, stride_v_head, stride_slot, stride_cache_head,
                     HEADS: tl.constexpr, DIM: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token: no slot
        return
    offs_h = tl.arange(0, HEADS)[:, None]
    offs_d = tl.arange(0, DIM)[None, :]
    mask = (offs_h < num_kv_heads) & (offs_d < head_dim)
    dst = slot * stride_slot + offs_h * stride_cache_head + offs_d
    k = tl.load(key_ptr + tok * stride_k_tok + offs_h * stride_k_head + offs_d, mask=mask)
    v = tl.load(value_ptr + tok * stride_v_tok + offs_h * stride_v_head + offs_d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter key/value [num_tokens, num_kv_heads, head_dim] into their slots; slot -1 is skipped (padding)."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and kv_cache.stride(-1) == 1, "head_dim must be contiguous"
    # Slots are flat over (block, position in block): valid because a block's positions are contiguous in the layout.
    assert kv_cache.stride(1) == kv_cache.shape[2] * kv_cache.stride(2), "cache blocks must be contiguous"
    _write_kv_kernel[(key.shape[0],)](
        key, value, kv_cache[0], kv_cache[1], slot_mapping, num_kv_heads, head_dim,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        HEADS=triton.next_power_of_2(num_kv_heads), DIM=triton.next_power_of_2(head_dim))
