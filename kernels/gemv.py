"""Skinny matmul for decode: out = x @ weight.T (+ bias) for a few rows of x (M <= MAX_ROWS), streaming the weight
once with no split over K.

At batch 1 on the Llama-3.1-8B shape cuBLAS streams the gate-up and down weights at 4.0-4.2 TB/s on an H200, but
the qkv and o projections (N of 6144 and 4096) at 3.1-3.3, and splits o and down over K with a reduction kernel
after each (1.7 us): about 0.2 ms of a 4.5 ms token (README, "Where batch-1 decode's time goes"). Here each
program owns BLOCK_N output columns and walks all of K, so there is nothing to reduce afterwards; how fast that
streams depends on the block shape, which only a GPU can pick. The GPU check's kernels step times every CONFIGS
entry against cuBLAS at the decode shapes (benchmarks/kernels.py, bench_gemv): the engine's `linear` stays
torch's (cuBLAS) until this wins there.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # tl.dot's smallest M: fewer rows are masked


class GemvConfig(NamedTuple):
    block_n: int  # output columns per program
    block_k: int  # weight columns per step of the walk over K
    num_warps: int
    num_stages: int
    use_dot: bool  # tensor cores on [MAX_ROWS, BLOCK_K] x [BLOCK_K, BLOCK_N]; else (one row only) a multiply-reduce


# Candidates the GPU check times; programs = N / block_n (128-1536 for N of 4096-24576: one to twelve an SM).
CONFIGS = (
    GemvConfig(16, 512, 4, 4, True),
    GemvConfig(32, 256, 4, 4, True),
    GemvConfig(64, 256, 8, 3, True),
    GemvConfig(8, 1024, 4, 3, False),
    GemvConfig(16, 512, 4, 4, False),
)


@triton.jit(do_not_specialize=("num_rows",))
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, num_rows, n, k, stride_x, stride_w, stride_out,
                 HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w
    offs_m = tl.arange(0, ROWS)
    m_mask = offs_m < num_rows
    if USE_DOT:
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
    for k_start in range(0, k, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if USE_DOT:
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        else:
            x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :] if USE_DOT else bias
    if USE_DOT:
        tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig = CONFIGS[0]) -> torch.Tensor:
    """kernels.reference.linear (the specification) for x [M <= MAX_ROWS, K] (one row unless config.use_dot)."""
    num_rows, k = x.shape
    n = weight.shape[0]
    if not 1 <= num_rows <= (MAX_ROWS if config.use_dot else 1):
        raise ValueError(f"gemv takes 1 to {MAX_ROWS if config.use_dot else 1} rows with this config, got {num_rows}")
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1, "K must match and be contiguous"
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias, out, num_rows, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, USE_DOT=config.use_dot, ROWS=MAX_ROWS, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out
