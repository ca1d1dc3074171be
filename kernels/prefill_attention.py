"""Prefill/extend attention over the paged cache, the whole batch in one launch.

Each program owns one KV head and a block of BLOCK_Q query tokens of one sequence, and stacks those tokens'
query heads of the KV head's group into the rows of one tile (row = token * group + head), so the keys are
loaded once for the whole group. The keys, the cached prefix and the chunk's own, are read from paged blocks.

Programs find their sequence without a host sync: sequence i owns program ids query_start_loc[i] // BLOCK_Q + i
onwards (at least ceil(q_len_i / BLOCK_Q) of them before sequence i + 1's), less those of the first sequence
attended, so num_tokens // BLOCK_Q + num_seqs programs cover any batch; the spare ones exit at once.
Per-step values are do_not_specialize, as in decode_attention.py: one compiled kernel per model and dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.decode_attention import (attend_tile, check_attention_args, check_seq_range, dot_precision, paged_offsets,
                                      score_scales, window_arg, wide_rows)

BLOCK_M = 64  # query rows (token, head) per program
TILE_N = 64  # keys per tile, halved for wide key rows to fit shared memory


@triton.jit
def _find_sequence(query_start_loc_ptr, program, first_seq, end_seq, BLOCK_Q: tl.constexpr):
    """Last sequence i in [first_seq, end_seq) with query_start_loc[i] // BLOCK_Q + i <= program (binary search)."""
    lo: tl.int32 = first_seq
    hi: tl.int32 = end_seq
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= program:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=("table_ptr", "seq_lens_ptr", "query_start_loc_ptr", "first_seq", "end_seq",
                               "stride_table"))
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, seq_lens_ptr, query_start_loc_ptr,
                    qk_scale, soft_cap, window, first_seq, end_seq, group, head_dim,
                    stride_q_tok, stride_q_head, stride_out_tok, stride_out_head,
                    stride_table, stride_block, stride_slot, stride_kv_head,
                    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
                    TILE: tl.constexpr, PRECISION: tl.constexpr, SOFT_CAP: tl.constexpr):
    # Program ids as if the batch began at sequence 0: those of first_seq start where its queries do.
    program = tl.program_id(0) + tl.load(query_start_loc_ptr + first_seq) // BLOCK_Q + first_seq
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, program, first_seq, end_seq, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = program - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:  # a spare program
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # positions of the cached prefix, before the chunk

    offs_m = tl.arange(0, ROWS)
    offs_d = tl.arange(0, DIM)
    d_mask = offs_d < head_dim
    token = q_block * BLOCK_Q + offs_m // group  # index within the chunk
    heads = kv_head * group + offs_m % group
    row_mask = (offs_m < BLOCK_Q * group) & (token < q_len)
    q_pos = context_len + token
    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(k_ptr.dtype.element_ty)

    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DIM], tl.float32)
    # Keys that any row of the block may see: from the first row's window start to the last row's position.
    lo = tl.maximum(context_len + q_block * BLOCK_Q - window + 1, 0)
    hi = context_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len)
    table_row_ptr = table_ptr + seq.to(tl.int64) * stride_table
    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_kv_head
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_kv_head
    for tile_start in range(lo, hi, TILE):
        k_pos = tile_start + tl.arange(0, TILE)
        valid = k_pos < hi
        rows = paged_offsets(table_row_ptr, k_pos, valid, BLOCK_SIZE, stride_block, stride_slot)
        visible = ((k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
                   & row_mask[:, None])
        acc, m, l = attend_tile(acc, m, l, q, k_head_ptr, v_head_ptr, rows, valid, visible,
                                offs_d, d_mask, qk_scale, soft_cap, PRECISION, SOFT_CAP)

    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # l is 0 only on masked rows, which are not stored
    tl.store(out_ptr + q_rows[:, None] * stride_out_tok + heads[:, None] * stride_out_head + offs_d[None, :],
             out, mask=row_mask[:, None] & d_mask[None, :])


def prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, first_seq: int, end_seq: int,
                      scale: float, max_seq_len: int, sliding_window: int | None = None,
                      logits_soft_cap: float | None = None, *, out: torch.Tensor) -> None:
    """kernels.reference.prefill_attention (the specification) in one launch for all the sequences."""
    check_seq_range(first_seq, end_seq, seq_lens)
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    check_attention_args(query, kv_cache, sliding_window, out)
    group = num_heads // num_kv_heads
    rows = max(BLOCK_M, triton.next_power_of_2(group))
    block_q = rows // group
    dim = triton.next_power_of_2(head_dim)
    wide = wide_rows(dim, kv_cache.element_size())
    # The sequences' tokens are at most num_tokens, so these programs cover them (see the module's docstring).
    _prefill_kernel[(num_tokens // block_q + end_seq - first_seq, num_kv_heads)](
        query, kv_cache[0], kv_cache[1], out, block_tables, seq_lens, query_start_loc,
        *score_scales(scale, logits_soft_cap), window_arg(sliding_window), first_seq, end_seq, group, head_dim,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, ROWS=rows, DIM=dim, TILE=TILE_N // 2 if wide else TILE_N,
        PRECISION=dot_precision(kv_cache.dtype), SOFT_CAP=logits_soft_cap is not None, num_stages=2 if wide else 3,
        num_warps=8 if wide else 4)  # wide rows: spread the [ROWS, DIM] accumulator over more registers
