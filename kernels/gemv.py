"""Skinny matmul for decode: out = x @ weight.T (+ bias) for a few rows of x (M <= MAX_ROWS), streaming the weight
once with no split over K.

At batch 1 on the Llama-3.1-8B shape cuBLAS streams the gate-up and down weights at 4.0-4.2 TB/s on an H200, but
the qkv and o projections (N of 6144 and 4096) at 3.1-3.3, and splits o and down over K with a reduction kernel
after each (1.7 us): about 0.2 ms of a 4.5 ms token (README, "Where batch-1 decode's time goes"). Here each
program owns BLOCK_N output columns and walks all of K, so there is nothing to reduce afterwards. How fast that
streams depends on the block shape and the GPU, so nothing is assumed: at warm-up `tune` times cuBLAS and every
CONFIGS entry on the model's own layers at each of ROW_BUCKETS, and in the decode steps' CUDA graphs the Triton
backend's `linear` calls gemv only where a config beat cuBLAS there (by MARGIN) with cuBLAS's output; everywhere
else it is cuBLAS's. The GPU check's kernels step reports the same comparison at the Llama-3-8B shapes
(benchmarks/kernels.py, bench_gemv).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 16  # tl.dot's smallest M: fewer rows are masked
ROW_BUCKETS = (1, 4, MAX_ROWS)  # a batch of r rows takes the choice tuned at the smallest bucket >= r
MARGIN = 1.05  # gemv is chosen only this much faster than cuBLAS: timings that close could flip from run to run
# Smaller weights stream in a few microseconds, where launches, not bandwidth, set the time: not worth tuning (and
# the GPU tests' many small models start no slower).
MIN_TUNED_ELEMENTS = 1 << 22


class GemvConfig(NamedTuple):
    block_n: int  # output columns per program
    block_k: int  # weight columns per step of the walk over K
    num_warps: int
    num_stages: int
    use_dot: bool  # tensor cores on [MAX_ROWS, BLOCK_K] x [BLOCK_K, BLOCK_N]; else (one row only) a multiply-reduce


# The candidates tune times; programs = N / block_n (Llama-3-8B: 64 to 768 for o and qkv, 448 to 3584 for gate-up,
# thousands for the LM head).
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


class Comparison(NamedTuple):
    """cuBLAS against each config that takes the rows, on the same x, weight and bias (milliseconds)."""
    cublas_ms: float
    gemv_ms: dict[GemvConfig, float]
    max_abs_diff: dict[GemvConfig, float]  # from cuBLAS's output


def compare(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            time_ms: Callable[[Callable[[], object]], float]) -> Comparison:
    """F.linear's time and gemv's in every config that takes x's rows, by time_ms, and how far each config's
    output is from F.linear's."""
    expected = F.linear(x, weight, bias).float()
    gemv_ms, diffs = {}, {}
    for config in CONFIGS:
        if x.shape[0] == 1 or config.use_dot:
            diffs[config] = (gemv(x, weight, bias, config).float() - expected).abs().max().item()
            gemv_ms[config] = time_ms(lambda config=config: gemv(x, weight, bias, config))
    return Comparison(time_ms(lambda: F.linear(x, weight, bias)), gemv_ms, diffs)


# (row bucket, N, K, has bias, dtype, device) -> the config that beat cuBLAS there; filled by tune, read by
# chosen_config
_choices: dict[tuple, GemvConfig] = {}
_reports: dict[tuple, list[dict]] = {}  # (N, K, has bias, dtype, device) -> tune's rows: each shape timed once


def _shape(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    return weight.shape[0], weight.shape[1], bias is not None, weight.dtype, weight.device


def chosen_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> GemvConfig | None:
    """The config `tune` chose for x's rows and this layer, when the call is being captured into a CUDA graph
    (tune timed the device alone; an eager call also pays gemv's launch, several microseconds more than cuBLAS's);
    None otherwise: cuBLAS."""
    if not _choices or not 1 <= x.shape[0] <= MAX_ROWS or not torch.cuda.is_current_stream_capturing():
        return None
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype != weight.dtype:
        return None
    bucket = next(b for b in ROW_BUCKETS if b >= x.shape[0])
    return _choices.get((bucket, *_shape(weight, bias)))


def forget_choices() -> None:
    """Drop what tune chose: graphs captured after this run on cuBLAS alone (the GPU check's A/B of gemv)."""
    _choices.clear()


@torch.inference_mode()
def tune(layers: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> list[dict]:
    """For each distinct (weight [N, K], bias) of the 16-bit CUDA layers with at least MIN_TUNED_ELEMENTS weights
    and each row bucket: time cuBLAS and every config whose output is within a 16-bit rounding of cuBLAS's on
    random rows; remember the fastest config if it beats cuBLAS by MARGIN. Once per shape and process (this
    compiles every config, so none compiles later). Returns a row per (shape, bucket) for the log; nothing to tune
    elsewhere (a CPU, fp32, small weights)."""
    report = {}
    for weight, bias in layers:
        if (weight.dim() != 2 or not weight.is_cuda or weight.dtype == torch.float32
                or weight.numel() < MIN_TUNED_ELEMENTS):
            continue
        shape = _shape(weight, bias)
        if shape not in _reports:
            _reports[shape] = _tune_shape(weight, bias, shape)
            torch.cuda.empty_cache()  # do_bench's L2-flushing buffer: the memory is the KV cache's
        report |= {(*shape[:3], row["rows"]): row for row in _reports[shape]}
    return list(report.values())


def _tune_shape(weight: torch.Tensor, bias: torch.Tensor | None, shape: tuple) -> list[dict]:
    from triton.testing import do_bench

    def median_ms(fn: Callable[[], object]) -> float:  # device time, the L2 flushed between runs
        return do_bench(fn, warmup=2, rep=10, return_mode="median")

    report = []
    for rows in ROW_BUCKETS:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        comparison = compare(x, weight, bias, median_ms)
        tolerance = 2e-2 * F.linear(x, weight, bias).float().abs().max().item() + 1e-6  # a 16-bit rounding
        timed = {c: ms for c, ms in comparison.gemv_ms.items() if comparison.max_abs_diff[c] <= tolerance}
        best = min(timed, key=timed.get, default=None)
        if best is not None and timed[best] * MARGIN < comparison.cublas_ms:
            _choices[(rows, *shape)] = best
        report.append({"n": shape[0], "k": shape[1], "bias": shape[2], "rows": rows,
                       "cublas_us": 1e3 * comparison.cublas_ms,
                       "gemv_us": None if best is None else 1e3 * timed[best], "chosen": _choices.get((rows, *shape))})
    return report
