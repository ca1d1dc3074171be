"""Fused mixture-of-experts, as vLLM's fused_moe: each token's top-k (token, expert) pairs are sorted by expert,
each expert's run padded to a multiple of the GEMM's row block (moe_align_block_size), so that every row block
of one grouped GEMM belongs to one expert and reads only that expert's weights. Two grouped GEMMs: gate_up
(hidden -> 2 x intermediate), then SiLU-and-mul (kernels/activation.py), then down (intermediate -> hidden), whose
epilogue scales each pair's row by its routing weight; a sum over the top-k rows of each token finishes.

Compiled variants: the block sizes depend only on whether the batch is small (decode) or large (prefill), and the
values that change from step to step (the padded length, the pair count, the metadata pointers) are
do_not_specialize, and so is top_k (one variant serves every model's), so per model and dtype the GEMM compiles
four kernels: {gate_up, down (which scales by the routing weight)} x {small, large blocks}; the alignment three
(its count, and its placement per block size).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.activation import silu_and_mul
from kernels.decode_attention import dot_precision


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int  # row blocks sharing a column sweep, so an expert's weight tiles are reused from L2


# vLLM's untuned defaults (fused_moe.get_default_config): small row blocks waste little padding when experts get
# few tokens each; large ones reuse each weight tile over more tokens.
SMALL_BATCH_CONFIG = GemmConfig(block_m=16, block_n=32, block_k=64, group_m=1)
LARGE_BATCH_CONFIG = GemmConfig(block_m=64, block_n=64, block_k=32, group_m=8)


# Alignment tiles: a program of the alignment kernels one-hot encodes a chunk of pairs against every expert,
# ALIGN_TILE elements (so fewer pairs per chunk for more experts), and sums ALIGN_ROWS chunks' counts at a time.
ALIGN_TILE = 8192
ALIGN_ROWS = 16


def choose_config(num_tokens: int, num_experts: int) -> GemmConfig:
    """Small blocks while a batch gives each expert at most a few tokens (vLLM's threshold: tokens <= experts)."""
    return SMALL_BATCH_CONFIG if num_tokens <= num_experts else LARGE_BATCH_CONFIG


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, k) pairs sorted by expert (in pair order within one), each expert's run padded to a multiple
    of block_size. Returns sorted_token_ids (int32, pair index token * top_k + k; padding holds num_pairs, past
    every pair), expert_ids (int32, the expert of each block) and num_tokens_post_padded (int32 [1], the padded
    length). The tensors are as long as the padded length can be, a bound known without reading topk_ids on the
    host, so no step waits for the device; the GEMM skips blocks past num_tokens_post_padded. Two launches (a
    count per chunk of pairs, then the placement), where torch ops would take some twenty: a decode step runs
    this in every MoE layer."""
    flat = topk_ids.flatten()
    num_pairs, device = flat.numel(), flat.device
    # Each expert that gets a token pads by at most block_size - 1, and at most num_pairs experts get one.
    max_blocks = triton.cdiv(num_pairs + min(num_pairs, num_experts) * (block_size - 1), block_size)
    experts_pow2 = triton.next_power_of_2(num_experts)
    chunk = max(16, ALIGN_TILE // experts_pow2)
    num_chunks = triton.cdiv(num_pairs, chunk)
    chunk_counts = torch.empty(num_chunks, experts_pow2, dtype=torch.int32, device=device)
    sorted_token_ids = torch.empty(max_blocks * block_size, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_tokens_post_padded = torch.empty(1, dtype=torch.int32, device=device)
    _count_experts_kernel[(num_chunks,)](flat, chunk_counts, num_pairs, EXPERTS=experts_pow2, CHUNK=chunk,
                                         num_warps=8)
    _align_kernel[(num_chunks,)](flat, chunk_counts, sorted_token_ids, expert_ids, num_tokens_post_padded,
                                 num_pairs, num_chunks, num_experts, max_blocks, BLOCK_SIZE=block_size,
                                 EXPERTS=experts_pow2, CHUNK=chunk, ROWS=ALIGN_ROWS, num_warps=8)
    return sorted_token_ids, expert_ids, num_tokens_post_padded


@triton.jit(do_not_specialize=("num_pairs",))
def _count_experts_kernel(topk_ids_ptr, chunk_counts_ptr, num_pairs, EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    """chunk_counts[chunk, e]: the pairs of this chunk of CHUNK that go to expert e."""
    chunk = tl.program_id(0)
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    # Pairs past the end read expert EXPERTS, which no column matches.
    ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=EXPERTS)
    one_hot = (ids[:, None] == tl.arange(0, EXPERTS)[None, :]).to(tl.int32)
    tl.store(chunk_counts_ptr + chunk * EXPERTS + tl.arange(0, EXPERTS), tl.sum(one_hot, axis=0))


@triton.jit(do_not_specialize=("num_pairs", "num_chunks", "max_blocks"))
def _align_kernel(topk_ids_ptr, chunk_counts_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
                  num_pairs, num_chunks, num_experts, max_blocks,
                  BLOCK_SIZE: tl.constexpr, EXPERTS: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr):
    """Each program places its chunk's pairs: expert e's run starts at its padded start plus the pairs of e in
    earlier chunks, then the pair's rank among e's pairs of this chunk. Program 0 also writes the padding, the
    expert of every block and the padded length."""
    chunk = tl.program_id(0)
    experts = tl.arange(0, EXPERTS)
    counts = tl.zeros((EXPERTS,), dtype=tl.int32)
    earlier = tl.zeros((EXPERTS,), dtype=tl.int32)
    for first in range(0, num_chunks, ROWS):
        rows = first + tl.arange(0, ROWS)
        tile = tl.load(chunk_counts_ptr + rows[:, None] * EXPERTS + experts[None, :], mask=(rows < num_chunks)[:, None],
                       other=0)
        counts += tl.sum(tile, axis=0)
        earlier += tl.sum(tl.where((rows < chunk)[:, None], tile, 0), axis=0)
    padded = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded

    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=EXPERTS)
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1
    slots = tl.sum((starts + earlier)[None, :] * one_hot, axis=1) + rank
    tl.store(sorted_token_ids_ptr + slots, pairs, mask=pairs < num_pairs)

    if chunk == 0:
        tl.store(num_tokens_post_padded_ptr, tl.sum(padded, axis=0))
        pad = tl.arange(0, BLOCK_SIZE)
        pad_slots = (starts + counts)[:, None] + pad[None, :]
        tl.store(sorted_token_ids_ptr + pad_slots, num_pairs, mask=(counts[:, None] + pad[None, :]) < padded[:, None])
        for first in range(0, max_blocks, CHUNK):
            blocks = first + tl.arange(0, CHUNK)
            # A block's expert: the number of runs that end at or before its start (empty runs end where they begin).
            expert = tl.sum((ends[None, :] <= (blocks * BLOCK_SIZE)[:, None]).to(tl.int32), axis=1)
            tl.store(expert_ids_ptr + blocks, tl.minimum(expert, num_experts - 1), mask=blocks < max_blocks)


@triton.jit(do_not_specialize=("sorted_token_ids_ptr", "expert_ids_ptr", "num_tokens_post_padded_ptr",
                               "max_padded", "num_pairs", "top_k"))
def _fused_moe_kernel(a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_token_ids_ptr, expert_ids_ptr,
                      num_tokens_post_padded_ptr, N, K, max_padded, num_pairs, top_k,
                      stride_am, stride_be, stride_bn, stride_cm, MUL_ROUTED_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c[pair] = a[pair // top_k] @ b[expert(pair)]^T (times the pair's routing weight) for the BLOCK_M sorted
    pairs and BLOCK_N output columns of this program. a [rows, K], b [experts, N, K], c [pairs, N]."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_pid_m = pid // pids_in_group * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_in_group) % group_size_m
    pid_n = (pid % pids_in_group) // group_size_m
    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
        return  # a block past the padded length: the bound over-allocates, this batch has fewer blocks

    pairs = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pair_mask = pairs < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pairs // top_k)[:, None] * stride_am + offs_k[None, :]
    # Columns past N wrap around instead of being masked: their loads stay in bounds, their stores are masked.
    b_ptrs = b_ptr + expert * stride_be + (offs_n % N)[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_ROUTED_WEIGHT:
        acc *= tl.load(topk_weights_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=pair_mask[:, None] & (offs_n[None, :] < N))


class _Routing(NamedTuple):
    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    topk_weights: torch.Tensor
    config: GemmConfig


def _grouped_gemm(a: torch.Tensor, weight: torch.Tensor, routing: _Routing, top_k: int,
                  mul_routed_weight: bool) -> torch.Tensor:
    """[num_pairs, N]: each pair's row of a (row pair // top_k) times its expert's weight [N, K] transposed."""
    num_pairs = routing.topk_weights.numel()
    _, n, k = weight.shape
    assert a.stride(-1) == 1 and weight.stride(-1) == 1, "the reduced dimension must be contiguous"
    out = torch.empty(num_pairs, n, dtype=a.dtype, device=a.device)
    cfg, max_padded = routing.config, routing.sorted_token_ids.numel()
    grid = (triton.cdiv(max_padded, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _fused_moe_kernel[grid](
        a, weight, out, routing.topk_weights, routing.sorted_token_ids, routing.expert_ids,
        routing.num_tokens_post_padded, n, k, max_padded, num_pairs, top_k,
        a.stride(0), weight.stride(0), weight.stride(1), out.stride(0), MUL_ROUTED_WEIGHT=mul_routed_weight, PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
    return out


def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Each token's output: the sum over its k experts e = topk_ids[t, k] of topk_weights[t, k] *
    w2[e] @ silu_and_mul(w13[e] @ x_t). hidden_states [T, H]; w13 [E, 2I, H] (gate rows, then up rows);
    w2 [E, H, I]; topk_weights [T, k] (fp32); topk_ids [T, k]. Returns [T, H] in hidden_states' dtype."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    config = choose_config(num_tokens, num_experts)
    routing = _Routing(*moe_align_block_size(topk_ids, config.block_m, num_experts),
                       topk_weights.contiguous(), config)
    gate_up = _grouped_gemm(hidden_states, w13, routing, top_k, mul_routed_weight=False)
    down = _grouped_gemm(silu_and_mul(gate_up), w2, routing, 1, mul_routed_weight=True)
    return down.view(num_tokens, top_k, -1).sum(dim=1)
