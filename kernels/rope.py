"""Rotary position embedding and the KV-cache write in one launch (one program per token): the query is rotated
in place, the key rotated on its way into its cache slot, the value copied into its own. One kernel instead of
two saves a launch per layer, which at batch 1 is as long as the KV write's work (README, "Where batch-1
decode's time goes"); SGLang fuses the two the same way. Qwen3's and Gemma 3's per-head RMSNorm of query and key
runs in the same pass (two launches fewer a layer again, as vLLM's fused_qk_norm_rope)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import rmsnorm


@triton.jit
def _rotate_heads(src, dst, cos, sin, offs_h, offs_i, num_heads, half, norm_w_ptr, norm_eps,
                  IS_NEOX: tl.constexpr, NORM: tl.constexpr, NORM_OFFSET: tl.constexpr):
    """Rotate the first 2 * half dims of heads src + offs_h (row pointers) into dst + offs_h: pairs (i, i + half)
    if neox, else (2i, 2i + 1). src may be dst: each pair is read and written by the same thread. NORM: each head
    goes through RMSNorm first (the rotation is then the whole head), rounded as kernels/rmsnorm.py rounds."""
    if IS_NEOX:
        first, second = offs_i, offs_i + half
    else:
        first, second = 2 * offs_i, 2 * offs_i + 1
    mask = (offs_h[:, None] < num_heads) & (offs_i[None, :] < half)
    x1 = tl.load(src + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + second[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + norm_eps)[:, None]
        w1 = tl.load(norm_w_ptr + first, mask=offs_i < half, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_w_ptr + second, mask=offs_i < half, other=0.0).to(tl.float32)[None, :]
        if NORM_OFFSET != 0.0:  # Gemma: x * (offset + w) in fp32, rounded once
            x1 = (x1 * rstd * (w1 + NORM_OFFSET)).to(src.dtype.element_ty).to(tl.float32)
            x2 = (x2 * rstd * (w2 + NORM_OFFSET)).to(src.dtype.element_ty).to(tl.float32)
        else:  # the normalised x rounded to its dtype, then times the weight, rounded again
            x1 = ((x1 * rstd).to(src.dtype.element_ty).to(tl.float32) * w1).to(src.dtype.element_ty).to(tl.float32)
            x2 = ((x2 * rstd).to(src.dtype.element_ty).to(tl.float32) * w2).to(src.dtype.element_ty).to(tl.float32)
    # Rounded to the source's dtype first, as rotating in place and then writing would.
    o1 = (x1 * cos - x2 * sin).to(src.dtype.element_ty).to(dst.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(src.dtype.element_ty).to(dst.dtype.element_ty)
    tl.store(dst + first[None, :], o1, mask=mask)
    tl.store(dst + second[None, :], o2, mask=mask)


@triton.jit
def _rotary_write_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                            q_norm_ptr, k_norm_ptr, norm_eps, num_heads, num_kv_heads, half, head_dim,
                            stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
                            stride_cos_sin, stride_slot, stride_cache_head,
                            IS_NEOX: tl.constexpr, NORM: tl.constexpr, NORM_OFFSET: tl.constexpr,
                            HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, DIM: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_i = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + offs_i, mask=offs_i < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cos_sin + half + offs_i, mask=offs_i < half,
                  other=0.0).to(tl.float32)[None, :]
    offs_q = tl.arange(0, HEADS)
    q_rows = q_ptr + tok * stride_q_tok + offs_q[:, None] * stride_q_head
    _rotate_heads(q_rows, q_rows, cos, sin, offs_q, offs_i, num_heads, half, q_norm_ptr, norm_eps, IS_NEOX, NORM,
                  NORM_OFFSET)

    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token: no slot
        return
    offs_h = tl.arange(0, KV_HEADS)
    k_rows = k_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head
    cache_rows = slot * stride_slot + offs_h[:, None] * stride_cache_head
    _rotate_heads(k_rows, k_cache_ptr + cache_rows, cos, sin, offs_h, offs_i, num_kv_heads, half, k_norm_ptr,
                  norm_eps, IS_NEOX, NORM, NORM_OFFSET)
    offs_d = tl.arange(0, DIM)[None, :]
    heads = offs_h[:, None] < num_kv_heads
    # The key's dims past the rotary ones (partial rotary) go in as they are; the value whole.
    tail = heads & (offs_d >= 2 * half) & (offs_d < head_dim)
    tl.store(k_cache_ptr + cache_rows + offs_d, tl.load(k_rows + offs_d, mask=tail).to(k_cache_ptr.dtype.element_ty),
             mask=tail)
    row = heads & (offs_d < head_dim)
    v = tl.load(v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d, mask=row)
    tl.store(v_cache_ptr + cache_rows + offs_d, v.to(v_cache_ptr.dtype.element_ty), mask=row)


def rotary_embedding_and_write_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                                  slot_mapping: torch.Tensor, is_neox: bool = True,
                                  q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                                  norm_eps: float = 1e-6, norm_weight_offset: float = 0.0) -> None:
    """kernels.reference.rotary_embedding_and_write_kv (the specification). Positions are not checked against the
    table (that would cost a sync): the model runner makes them, each below max_model_len."""
    assert (query.stride(-1) == key.stride(-1) == value.stride(-1) == cos_sin_cache.stride(-1) == kv_cache.stride(-1)
            == 1), "head_dim must be contiguous"
    # Slots are flat over (block, position in block): valid because a block's positions are contiguous in the layout.
    assert kv_cache.stride(1) == kv_cache.shape[2] * kv_cache.stride(2), "cache blocks must be contiguous"
    half = cos_sin_cache.shape[-1] // 2
    num_tokens, num_heads, head_dim = query.shape
    assert 2 * half <= head_dim, f"rotary_dim {cos_sin_cache.shape[-1]} exceeds head_dim {head_dim}"
    norm = q_norm_weight is not None
    assert norm == (k_norm_weight is not None), "query and key are normalised together"
    # Two passes where the fused one would not round as rms_norm does: partial rotary (the norm reads whole heads,
    # the rotation pairs) or a weight of another dtype (rms_norm's output takes the wider one).
    if norm and (2 * half < head_dim or not query.dtype == key.dtype == q_norm_weight.dtype == k_norm_weight.dtype):
        query.copy_(rmsnorm.rms_norm(query, q_norm_weight, norm_eps, None, norm_weight_offset))
        key = rmsnorm.rms_norm(key, k_norm_weight, norm_eps, None, norm_weight_offset)
        norm = False
    num_kv_heads = key.shape[1]
    _rotary_write_kv_kernel[(num_tokens,)](
        positions, query, key, value, cos_sin_cache, kv_cache[0], kv_cache[1], slot_mapping,
        q_norm_weight if norm else None, k_norm_weight if norm else None, norm_eps,
        num_heads, num_kv_heads, half, head_dim,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos_sin_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        IS_NEOX=is_neox, NORM=norm, NORM_OFFSET=float(norm_weight_offset) if norm else 0.0,
        HEADS=triton.next_power_of_2(num_heads), KV_HEADS=triton.next_power_of_2(num_kv_heads),
        HALF=triton.next_power_of_2(half), DIM=triton.next_power_of_2(head_dim))
