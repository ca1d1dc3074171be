"""Rotary position embedding, applied in place to query and key in one launch (one program per token)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_tok, stride_head, tok, num_heads, cos, sin, offs_h, offs_i, half,
                  IS_NEOX: tl.constexpr):
    """Rotate the first 2 * half dims of each head of one token: pairs (i, i + half) if neox, else (2i, 2i + 1)."""
    if IS_NEOX:
        first, second = offs_i, offs_i + half
    else:
        first, second = 2 * offs_i, 2 * offs_i + 1
    base = x_ptr + tok * stride_tok + offs_h[:, None] * stride_head
    mask = (offs_h[:, None] < num_heads) & (offs_i[None, :] < half)
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(base + first[None, :], (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + second[None, :], (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, num_heads, num_kv_heads, half,
                   stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cache,
                   IS_NEOX: tl.constexpr, HEADS: tl.constexpr, HALF: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_i = tl.arange(0, HALF)
    offs_h = tl.arange(0, HEADS)
    cos = tl.load(cache_ptr + pos * stride_cache + offs_i, mask=offs_i < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + half + offs_i, mask=offs_i < half, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, stride_q_tok, stride_q_head, tok, num_heads, cos, sin, offs_h, offs_i, half, IS_NEOX)
    _rotate_heads(k_ptr, stride_k_tok, stride_k_head, tok, num_kv_heads, cos, sin, offs_h, offs_i, half, IS_NEOX)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim] in place.
    cos_sin_cache [max_position, rotary_dim]: cos in the first half, sin in the second; rotary_dim may be < head_dim.
    neox rotates (x[:half], x[half:]) pairs; GPT-J rotates interleaved (x[0::2], x[1::2]) pairs."""
    assert query.stride(-1) == key.stride(-1) == cos_sin_cache.stride(-1) == 1, "head_dim must be contiguous"
    half = cos_sin_cache.shape[-1] // 2
    num_tokens, num_heads = query.shape[:2]
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache, num_heads, key.shape[1], half,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin_cache.stride(0),
        IS_NEOX=is_neox, HEADS=triton.next_power_of_2(max(num_heads, key.shape[1])),
        HALF=triton.next_power_of_2(half))
