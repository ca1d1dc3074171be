"""Paged decode attention: one query token per sequence, flash-decoding style.

Stage 1 runs one program per (sequence, KV head, split): the program loads the KV head's keys once for all the
query heads that share it (GQA group padded to a power of two, extra rows masked) and walks its split of the
context in tiles with an online softmax. Stage 2 merges the splits' partial outputs by their log-sum-exp.
Splitting the context keeps the GPU busy when a small batch has long contexts; with one split, stage 1 writes
the output itself and there is no stage 2.

Compiled variants: Triton compiles a kernel once per specialization of its arguments (ints equal to 1 or
divisible by 16, pointers aligned to 16 bytes), seconds on a GPU. Values that change from step to step (which
sequences, the split count, the block table's width) are do_not_specialize, and so are the metadata pointers,
whose scalar loads gain nothing from alignment. Query, output and cache pointers keep it (wide loads and
stores): callers pass whole tensors and select sequences by index. So per model and dtype decode compiles three
kernels: stage 1 writing the output, stage 1 writing partials, and the merge.

The tile step, the paged addressing and these conventions are shared with prefill_attention.py.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.activation import tanh

TILE_N = 32  # keys per tile: a tile may straddle cache blocks, each key finds its block through the table
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in the merge than it gains in parallelism
MAX_SPLITS = 32  # a power of two: the merge kernel's constexpr width
PROGRAMS_PER_SM = 4  # enough resident programs per SM to hide memory latency
INTERPRETER_SMS = 4  # pretend SM count off-GPU, so the interpreter exercises split-K on modest contexts
LOG2E = 1.4426950408889634  # softmax runs in base 2 (exp2 is the fast hardware path)


@triton.jit
def paged_offsets(table_row_ptr, pos, valid, BLOCK_SIZE: tl.constexpr, stride_block, stride_slot):
    """Cache offsets (int64, head offset excluded) of the tokens at positions pos, through one block-table row."""
    block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return block * stride_block + (pos % BLOCK_SIZE) * stride_slot


@triton.jit
def attend_tile(acc, m, l, q, k_ptr, v_ptr, rows, valid, visible, offs_d, d_mask, qk_scale, soft_cap,
                PRECISION: tl.constexpr, SOFT_CAP: tl.constexpr):
    """One online-softmax step of q [M, D] against a tile of keys.

    rows [N]: cache offsets of the tile's keys; valid [N]: keys that exist (others are not loaded);
    visible [M, N] (or broadcastable): which query row sees which key. m is the running max of the base-2
    scores, l the running sum of their exponentials, acc the unnormalised output. qk_scale and soft_cap are
    score_scales' (the cap folded into base 2)."""
    kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if SOFT_CAP:
        s = soft_cap * tanh(s)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps its weights at exactly 0.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l


@triton.jit(do_not_specialize=("table_ptr", "seq_lens_ptr", "first_seq", "num_splits", "stride_table"))
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, seq_lens_ptr, out_ptr, mid_out_ptr, mid_lse_ptr,
                         qk_scale, soft_cap, window, first_seq, num_splits, group, head_dim,
                         stride_q_seq, stride_q_head, stride_out_seq, stride_out_head,
                         stride_table, stride_block, stride_slot, stride_kv_head,
                         BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, DIM: tl.constexpr,
                         TILE: tl.constexpr, PRECISION: tl.constexpr, SOFT_CAP: tl.constexpr,
                         SPLIT_K: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    seq = first_seq + program
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Visible keys are [lo, seq_len): the query sits at seq_len - 1 and sees k_pos > q_pos - window.
    lo = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), TILE) * TILE
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, GROUP)
    offs_d = tl.arange(0, DIM)
    h_mask = offs_h < group
    d_mask = offs_d < head_dim
    hd_mask = h_mask[:, None] & d_mask[None, :]
    heads = kv_head * group + offs_h
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=hd_mask, other=0.0).to(k_ptr.dtype.element_ty)

    m = tl.full([GROUP], float("-inf"), tl.float32)
    l = tl.zeros([GROUP], tl.float32)
    acc = tl.zeros([GROUP, DIM], tl.float32)
    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_kv_head
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_kv_head
    for tile_start in range(start, end, TILE):
        pos = tile_start + tl.arange(0, TILE)
        valid = pos < end
        rows = paged_offsets(table_ptr + seq * stride_table, pos, valid, BLOCK_SIZE, stride_block, stride_slot)
        acc, m, l = attend_tile(acc, m, l, q, k_head_ptr, v_head_ptr, rows, valid, valid[None, :],
                                offs_d, d_mask, qk_scale, soft_cap, PRECISION, SOFT_CAP)

    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    if SPLIT_K:
        # Partials per (program, head, split); an empty split stores lse = -inf and a zero output, weight 0 in
        # the merge.
        mid = (program * tl.num_programs(1) * group + heads) * num_splits + split
        lse = tl.where(l > 0.0, m + tl.log2(tl.maximum(l, 1e-30)), float("-inf"))
        tl.store(mid_lse_ptr + mid, lse, mask=h_mask)
        tl.store(mid_out_ptr + mid[:, None] * DIM + offs_d[None, :], out, mask=hd_mask)
    else:
        tl.store(out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + offs_d[None, :], out,
                 mask=hd_mask)


@triton.jit(do_not_specialize=("first_seq", "num_splits"))
def _merge_splits_kernel(mid_out_ptr, mid_lse_ptr, out_ptr, first_seq, num_splits, head_dim,
                         stride_out_seq, stride_out_head, SPLITS: tl.constexpr, DIM: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, DIM)
    mid = (program * tl.num_programs(1) + head) * num_splits + offs_s
    s_mask = offs_s < num_splits
    lse = tl.load(mid_lse_ptr + mid, mask=s_mask, other=float("-inf"))
    # The split holding the query's own key is never empty, so the max is finite and every weight well defined.
    weights = tl.exp2(lse - tl.max(lse, axis=0))
    d_mask = offs_d < head_dim
    parts = tl.load(mid_out_ptr + mid[:, None] * DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0)
    out = tl.sum(weights[:, None] * parts, axis=0) / tl.sum(weights, axis=0)
    seq = first_seq + program
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + offs_d, out, mask=d_mask)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, first_seq: int, end_seq: int, scale: float, max_seq_len: int,
                           sliding_window: int | None = None, logits_soft_cap: float | None = None, *,
                           out: torch.Tensor) -> None:
    """kernels.reference.paged_decode_attention (the specification), each context cut in as many splits as
    fill the GPU."""
    check_seq_range(first_seq, end_seq, seq_lens)
    # A sliding window bounds the keys any query sees, and so the work there is to split.
    max_keys = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
    num_splits = choose_num_splits((end_seq - first_seq) * kv_cache.shape[3], max_keys, query.device)
    decode_with_splits(query, kv_cache, block_tables, seq_lens, first_seq, end_seq, scale, sliding_window, num_splits,
                       logits_soft_cap, out=out)


def decode_with_splits(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, first_seq: int, end_seq: int, scale: float, sliding_window: int | None,
                       num_splits: int, logits_soft_cap: float | None = None, *, out: torch.Tensor) -> None:
    """paged_decode_attention with the context of every sequence cut into num_splits parts."""
    check_seq_range(first_seq, end_seq, seq_lens)
    num_seqs = end_seq - first_seq
    num_heads, head_dim = query.shape[1:]
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    check_attention_args(query, kv_cache, sliding_window, out)
    assert 1 <= num_splits <= MAX_SPLITS, f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}"
    group = num_heads // num_kv_heads
    dim = triton.next_power_of_2(head_dim)
    split_k = num_splits > 1
    mid_out = mid_lse = None  # one split: stage 1 writes out itself
    if split_k:
        mid_out = torch.empty(num_seqs, num_heads, num_splits, dim, dtype=torch.float32, device=query.device)
        mid_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, kv_cache[0], kv_cache[1], block_tables, seq_lens, out, mid_out, mid_lse,
        *score_scales(scale, logits_soft_cap), window_arg(sliding_window), first_seq, num_splits, group, head_dim,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        BLOCK_SIZE=block_size, GROUP=max(16, triton.next_power_of_2(group)), DIM=dim,
        TILE=TILE_N, PRECISION=dot_precision(kv_cache.dtype), SOFT_CAP=logits_soft_cap is not None, SPLIT_K=split_k,
        num_stages=2 if wide_rows(dim, kv_cache.element_size()) else 3)
    if split_k:
        # SPLITS is always MAX_SPLITS (the tail masked off), so the merge compiles once, whatever the split count.
        _merge_splits_kernel[(num_seqs, num_heads)](
            mid_out, mid_lse, out, first_seq, num_splits, head_dim, out.stride(0), out.stride(1),
            SPLITS=MAX_SPLITS, DIM=dim)


def choose_num_splits(num_programs: int, max_seq_len: int, device: torch.device) -> int:
    """Splits per sequence: enough programs to fill the SMs, but none shorter than MIN_SPLIT_TOKENS keys."""
    wanted = math.ceil(PROGRAMS_PER_SM * _num_sms(device) / max(num_programs, 1))
    return max(1, min(wanted, math.ceil(max_seq_len / MIN_SPLIT_TOKENS), MAX_SPLITS))


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 caches get exact fp32 dots (tf32 would miss the reference by ~1e-3); 16-bit inputs keep the default."""
    return "ieee" if dtype == torch.float32 else None


def wide_rows(dim: int, elem: int) -> bool:
    """Key rows over 256 bytes (head dim 256, or fp32 from 128): then fewer K/V tiles fit in shared memory."""
    return dim * elem > 256


def score_scales(scale: float, logits_soft_cap: float | None) -> tuple[float, float]:
    """(qk_scale, soft_cap) as the kernels take them, scores in base 2: without a cap, s = qk.scale.log2(e);
    with one, s = cap.log2(e) * tanh(qk.scale / cap). The cap is unused without SOFT_CAP."""
    if logits_soft_cap is None:
        return scale * LOG2E, 0.0
    if logits_soft_cap <= 0:
        raise ValueError(f"logits_soft_cap must be None or > 0, got {logits_soft_cap}")
    return scale / logits_soft_cap, logits_soft_cap * LOG2E


def window_arg(sliding_window: int | None) -> int:
    """The window as the kernels take it: no window is one wider than any context (and still an int32)."""
    return 2**31 - 1 if sliding_window is None else sliding_window


def check_seq_range(first_seq: int, end_seq: int, seq_lens: torch.Tensor) -> None:
    """The sequences attended, rows first_seq .. end_seq - 1: at least one, all in the batch."""
    assert 0 <= first_seq < end_seq <= seq_lens.shape[0], \
        f"sequences [{first_seq}, {end_seq}) must be a non-empty range of the batch's {seq_lens.shape[0]}"


def check_attention_args(query: torch.Tensor, kv_cache: torch.Tensor, sliding_window: int | None,
                         out: torch.Tensor) -> None:
    """Layout and argument checks shared by the attention launchers."""
    num_heads, num_kv_heads = query.shape[-2], kv_cache.shape[3]
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads do not group over {num_kv_heads} KV heads"
    assert out.shape == query.shape, f"out {tuple(out.shape)} must have the query's shape {tuple(query.shape)}"
    assert query.stride(-1) == 1 and kv_cache.stride(-1) == 1 and out.stride(-1) == 1, "head_dim must be contiguous"
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
