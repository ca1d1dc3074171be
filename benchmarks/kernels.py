"""Kernel micro-benchmarks on a CUDA GPU: every Triton kernel at Llama-3-8B shapes.

    python -m benchmarks.kernels [--dtype bf16|fp16]

Each kernel is timed with triton.testing.do_bench. Bandwidth is compulsory traffic (every input read once,
every output written once) over time; compared with the copy bandwidth and bf16 matmul throughput measured in
the same run. Attention is compared with torch's scaled_dot_product_attention on the same data held dense
(unpaged): frac_of_sdpa = sdpa_time / kernel_time, so above 1 means faster than SDPA.
Prints a table and the JSON it writes to benchmarks/results/kernels-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kernels import KernelOps, get_ops

# Llama-3-8B
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
HIDDEN, INTERMEDIATE = 4096, 14336
DECODE_BATCHES = (64, 128, 256)
DECODE_CONTEXTS = (1024, 2048, 4096, 8192)
PREFILL_TOKENS = 4096
ELEMENTWISE_TOKENS = (256, 4096)  # a decode batch and a prefill chunk
INT32, INT64, FP32 = 4, 8, 4
RESULTS_DIR = Path(__file__).parent / "results"


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


def rotary_traffic(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, elem: int) -> Traffic:
    """Query and key read and written in place, one fp32 cos/sin row and one int64 position per token."""
    return Traffic(2 * num_tokens * (num_heads + num_kv_heads) * head_dim * elem
                   + num_tokens * (head_dim * FP32 + INT64), 0)


def silu_and_mul_traffic(num_tokens: int, intermediate: int, elem: int) -> Traffic:
    return Traffic(3 * num_tokens * intermediate * elem, 0)


def kv_write_traffic(num_tokens: int, num_kv_heads: int, head_dim: int, elem: int) -> Traffic:
    """Key and value read, then written to their slots; one int64 slot per token."""
    return Traffic(4 * num_tokens * num_kv_heads * head_dim * elem + num_tokens * INT64, 0)


class Limits(NamedTuple):
    copy_bw_gbps: float
    matmul_tflops: float


def measure_limits() -> Limits:
    """Achievable device limits: a 2 GiB copy (read + write) and an 8192^3 bf16 matmul."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_s = _bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    matmul_s = _bench(lambda: a @ a)
    return Limits(2 * src.numel() * src.element_size() / copy_s / 1e9, 2 * 8192**3 / matmul_s / 1e12)


def _bench(fn: Callable[[], object]) -> float:
    """Seconds per call (median of do_bench's runs, L2 flushed between them)."""
    return do_bench(fn, warmup=25, rep=100) / 1e3


def _record(kernel: str, shape: dict, dtype: torch.dtype, seconds: float, traffic: Traffic, limits: Limits,
            sdpa_seconds: float | None = None) -> dict:
    gbps = traffic.bytes / seconds / 1e9
    tflops = traffic.flops / seconds / 1e12
    return {"kernel": kernel, "batch": None, "context_len": None, "num_heads": None, "num_kv_heads": None,
            "head_dim": None, "block_size": None, **shape, "dtype": str(dtype).removeprefix("torch."),
            "time_us": seconds * 1e6, "gbps": gbps, "tflops": tflops,
            "frac_of_copy_bw": gbps / limits.copy_bw_gbps, "frac_of_matmul": tflops / limits.matmul_tflops,
            "frac_of_sdpa": None if sdpa_seconds is None else sdpa_seconds / seconds}


def _paged_cache(batch: int, context_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache with every sequence's blocks scattered over it (a shuffled block table)."""
    blocks_per_seq = math.ceil(context_len / BLOCK_SIZE)
    kv_cache = torch.randn(2, batch * blocks_per_seq, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    block_tables = torch.randperm(batch * blocks_per_seq, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    return kv_cache, block_tables


def _dense_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor,
              context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same keys and values as SDPA wants them: [batch, num_kv_heads, context_len, head_dim]."""
    kv = kv_cache[:, block_tables.long()].flatten(2, 3)[:, :, :context_len].transpose(2, 3).contiguous()
    return kv[0], kv[1]


def bench_decode(ops: KernelOps, dtype: torch.dtype, limits: Limits) -> list[dict]:
    records = []
    for batch in DECODE_BATCHES:
        for context_len in DECODE_CONTEXTS:
            kv_cache, block_tables = _paged_cache(batch, context_len, dtype)
            seq_lens = torch.full((batch,), context_len, dtype=torch.int32, device="cuda")
            query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
            out = torch.empty_like(query)
            scale = HEAD_DIM ** -0.5
            seconds = _bench(lambda: ops.paged_decode_attention(query, kv_cache, block_tables, seq_lens, slice(None),
                                                                scale, context_len, out=out))
            key, value = _dense_kv(kv_cache, block_tables, context_len)
            del kv_cache
            q = query[:, :, None]
            sdpa_seconds = _bench(lambda: F.scaled_dot_product_attention(q, key, value, scale=scale, enable_gqa=True))
            del key, value
            shape = {"batch": batch, "context_len": context_len, "num_heads": NUM_HEADS,
                     "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE}
            traffic = decode_traffic(batch, context_len, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                                     query.element_size())
            records.append(_record("paged_decode_attention", shape, dtype, seconds, traffic, limits, sdpa_seconds))
            torch.cuda.empty_cache()
    return records


def bench_prefill(ops: KernelOps, dtype: torch.dtype, limits: Limits) -> list[dict]:
    kv_cache, block_tables = _paged_cache(1, PREFILL_TOKENS, dtype)
    seq_lens = torch.tensor([PREFILL_TOKENS], dtype=torch.int32, device="cuda")
    query_start_loc = torch.tensor([0, PREFILL_TOKENS], dtype=torch.int32, device="cuda")
    query = torch.randn(PREFILL_TOKENS, NUM_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    out = torch.empty_like(query)
    scale = HEAD_DIM ** -0.5
    seconds = _bench(lambda: ops.prefill_attention(query, kv_cache, block_tables, seq_lens, query_start_loc,
                                                   slice(None), scale, PREFILL_TOKENS, out=out))
    key, value = _dense_kv(kv_cache, block_tables, PREFILL_TOKENS)
    q = query.transpose(0, 1)[None].contiguous()
    sdpa_seconds = _bench(lambda: F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=scale,
                                                                 enable_gqa=True))
    shape = {"batch": 1, "context_len": PREFILL_TOKENS, "num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS,
             "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE}
    traffic = prefill_traffic(0, PREFILL_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, query.element_size())
    return [_record("prefill_attention", shape, dtype, seconds, traffic, limits, sdpa_seconds)]


def bench_elementwise(ops: KernelOps, dtype: torch.dtype, limits: Limits) -> list[dict]:
    """RMSNorm(+residual), rotary, SiLU-and-mul and the cache write at a decode batch and a prefill chunk."""
    elem = torch.finfo(dtype).bits // 8
    records = []
    for tokens in ELEMENTWISE_TOKENS:
        x, residual = (torch.randn(tokens, HIDDEN, dtype=dtype, device="cuda") for _ in range(2))
        weight = torch.randn(HIDDEN, dtype=dtype, device="cuda")
        records.append(_record("rms_norm", {"batch": tokens, "hidden": HIDDEN}, dtype,
                               _bench(lambda: ops.rms_norm(x, weight, 1e-5, residual)),
                               rms_norm_traffic(tokens, HIDDEN, elem), limits))
        query = torch.randn(tokens, NUM_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
        key = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
        positions = torch.randint(0, 8192, (tokens,), device="cuda")
        cos_sin_cache = torch.randn(8192, HEAD_DIM, device="cuda")
        heads = {"batch": tokens, "num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM}
        records.append(_record("rotary_embedding", heads, dtype,
                               _bench(lambda: ops.rotary_embedding(positions, query, key, cos_sin_cache)),
                               rotary_traffic(tokens, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, elem), limits))
        gate_up = torch.randn(tokens, 2 * INTERMEDIATE, dtype=dtype, device="cuda")
        records.append(_record("silu_and_mul", {"batch": tokens, "intermediate": INTERMEDIATE}, dtype,
                               _bench(lambda: ops.silu_and_mul(gate_up)),
                               silu_and_mul_traffic(tokens, INTERMEDIATE, elem), limits))
        kv_cache = torch.empty(2, tokens // BLOCK_SIZE * 4, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype,
                               device="cuda")
        slots = torch.randperm(kv_cache.shape[1] * BLOCK_SIZE, device="cuda")[:tokens]
        records.append(_record("write_kv_cache", {**heads, "num_heads": None, "block_size": BLOCK_SIZE}, dtype,
                               _bench(lambda: ops.write_kv_cache(key, key, kv_cache, slots)),
                               kv_write_traffic(tokens, NUM_KV_HEADS, HEAD_DIM, elem), limits))
    return records


def _device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _print_table(records: list[dict]) -> None:
    print(f"{'kernel':<24}{'batch':>6}{'ctx':>6}{'time_us':>10}{'GB/s':>8}{'TFLOP/s':>9}{'of_copy':>8}{'vs_sdpa':>8}")
    for r in records:
        sdpa = "" if r["frac_of_sdpa"] is None else f"{r['frac_of_sdpa']:.2f}"
        print(f"{r['kernel']:<24}{r['batch']:>6}{r['context_len'] or '':>6}{r['time_us']:>10.1f}{r['gbps']:>8.0f}"
              f"{r['tflops']:>9.1f}{r['frac_of_copy_bw']:>8.2f}{sdpa:>8}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py times the Triton kernels on a CUDA GPU, and this machine has none.")
    ops = get_ops("triton")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    limits = measure_limits()
    records = [record for bench in (bench_decode, bench_prefill, bench_elementwise)
               for record in bench(ops, dtype, limits)]
    date = datetime.date.today().isoformat()
    report = {"device": torch.cuda.get_device_name(), "date": date,
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "copy_bw_gbps": limits.copy_bw_gbps, "matmul_tflops": limits.matmul_tflops, "results": records}
    _print_table(records)
    print(json.dumps(report, indent=1))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"kernels-{_device_slug()}-{date}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
