"""What a kernel must move and compute (compulsory traffic: every input read once, every output written once),
and the device's achievable limits to hold it against: the roofline that benchmarks/kernels.py and
`tokmodel profile` report each kernel's fraction of."""
from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

import torch

INT32, INT64, FP32 = 4, 8, 4


class Limits(NamedTuple):
    copy_bw_gbps: float
    matmul_tflops: float



class Traffic(NamedTuple):
    bytes: int
    flops: int


def decode_traffic(batch: int, context_len: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   block_size: int, elem: int) -> Traffic:
    """K and V of every context token once, query in, output out, seq_lens and the used block-table entries."""
    kv = 2 * batch * context_len * num_kv_heads * head_dim * elem
    q_and_out = 2 * batch * num_heads * head_dim * elem
    metadata = batch * INT32 + batch * math.ceil(context_len / block_size) * INT32
    # QK^T and PV: 2 FLOPs per multiply-add each, per (query head, key, dim).
    return Traffic(kv + q_and_out + metadata, 4 * batch * num_heads * context_len * head_dim)


def prefill_traffic(prefix_len: int, q_len: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    block_size: int, elem: int) -> Traffic:
    """One sequence's chunk of q_len tokens after prefix_len cached ones; FLOPs count only causal (visible) pairs."""
    seq_len = prefix_len + q_len
    kv = 2 * seq_len * num_kv_heads * head_dim * elem
    q_and_out = 2 * q_len * num_heads * head_dim * elem
    metadata = math.ceil(seq_len / block_size) * INT32 + 3 * INT32  # table row, seq_len, query_start_loc
    visible_pairs = q_len * prefix_len + q_len * (q_len + 1) // 2
    return Traffic(kv + q_and_out + metadata, 4 * num_heads * head_dim * visible_pairs)


def rms_norm_traffic(num_tokens: int, hidden: int, elem: int) -> Traffic:
    """With a residual: x and residual in, output and new residual out, the weight once."""
    return Traffic(4 * num_tokens * hidden * elem + hidden * elem, 0)


def rotary_write_kv_traffic(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, elem: int) -> Traffic:
    """Query read and written in place, key and value read and written to their slots; one fp32 cos/sin row, one
    int64 position and one int64 slot per token."""
    return Traffic(2 * num_tokens * (num_heads + 2 * num_kv_heads) * head_dim * elem
                   + num_tokens * (head_dim * FP32 + 2 * INT64), 0)


def silu_and_mul_traffic(num_tokens: int, intermediate: int, elem: int) -> Traffic:
    return Traffic(3 * num_tokens * intermediate * elem, 0)


def linear_traffic(rows: int, inputs: int, outputs: int, elem: int) -> Traffic:
    """x [rows, inputs] @ weight.T: the weight read once, x read and the output written."""
    return Traffic((outputs * inputs + rows * (inputs + outputs)) * elem, 2 * rows * inputs * outputs)


def embedding_traffic(num_tokens: int, hidden: int, elem: int) -> Traffic:
    """Each token's row read and written, one int64 id per token."""
    return Traffic(2 * num_tokens * hidden * elem + num_tokens * INT64, 0)


def measure_limits(device: str, sweep, dtype: torch.dtype = torch.bfloat16) -> Limits:
    """Achievable device limits: a copy of sweep.copy_elements (read + write; 2 GiB in bf16 for the kernel
    benchmark's full sweep) and an n^3 matmul of n = sweep.matmul_size."""
    return Limits(copy_bandwidth_gbps(device, sweep.copy_elements, dtype),
                  _matmul_tflops(device, sweep.matmul_size, dtype))


def copy_bandwidth_gbps(device: str, num_elements: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(num_elements, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / bench_seconds(lambda: dst.copy_(src), device) / 1e9


def _matmul_tflops(device: str, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / bench_seconds(lambda: a @ a, device) / 1e12


def bench_seconds(fn: Callable[[], object], device: str) -> float:
    """Seconds per call: on a GPU the median of do_bench's runs (L2 flushed between them); on the CPU, where the
    dry run times kernels in Triton's interpreter only to exercise the code, the best of three calls."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100) / 1e3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
