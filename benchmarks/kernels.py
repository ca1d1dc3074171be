"""Kernel micro-benchmarks on a CUDA GPU: every Triton kernel at Llama-3-8B shapes, and the fused MoE at the
Mixtral-8x7B and Qwen3-30B-A3B shapes.

    python -m benchmarks.kernels [--dtype bf16|fp16]

Each kernel is timed with triton.testing.do_bench. Bandwidth is compulsory traffic (every input read once,
every output written once) over time; compared with the copy bandwidth and matmul throughput measured in
the same run. Attention is compared with torch's scaled_dot_product_attention on the same data held dense
(unpaged): frac_of_sdpa = sdpa_time / kernel_time, so above 1 means faster than SDPA; prefill against SDPA's
flash backend. The fused MoE reads the weights of every expert its tokens go to: a decode batch is bound by
that read (frac_of_copy_bw), a prefill chunk by its GEMMs (frac_of_matmul). Prints a table and the JSON it writes to benchmarks/results/kernels-<device>-<date>.json.

benchmarks/gpu_check.py runs the same functions with its own sweep, and at tiny sizes on the CPU (the kernels
in Triton's interpreter, timed with a plain clock) for its dry run.
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
from torch.nn.attention import SDPBackend, sdpa_kernel

# copy_bandwidth_gbps and measure_limits: benchmarks/gpu_check_steps.py takes them from here
from bench.roofline import (FP32, INT64, Limits, Traffic, bench_seconds, copy_bandwidth_gbps,  # noqa: F401
                            decode_traffic, linear_traffic, measure_limits, prefill_traffic, rms_norm_traffic,
                            rotary_write_kv_traffic, silu_and_mul_traffic)
from kernels import KernelOps, gemv, get_ops
from kernels.decode_attention import MAX_SPLITS, choose_num_splits, decode_with_splits

RESULTS_DIR = Path(__file__).parent / "results"


class Shape(NamedTuple):
    """The model dimensions the kernels see."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    hidden: int
    intermediate: int


class MoeShape(NamedTuple):
    """The dimensions a mixture-of-experts block's fused_moe sees."""
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int  # of one expert


class Sweep(NamedTuple):
    """The sizes one run times, and those of its reference measurements."""
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    prefill_tokens: int
    elementwise_tokens: tuple[int, ...]  # a decode batch and a prefill chunk
    moe_tokens: tuple[int, ...]  # decode batches (weight-bandwidth bound) and a prefill chunk (compute bound)
    copy_elements: int  # of the copy that measures bandwidth
    matmul_size: int  # n of the n x n x n matmul that measures throughput
    split_batches: tuple[int, ...] = (1, 8)  # small decode batches timed at every split count (bench_decode_splits)
    split_contexts: tuple[int, ...] = (256, 2048)
    gemv_rows: tuple[int, ...] = gemv.ROW_BUCKETS  # decode batches of the skinny-matmul comparison (bench_gemv)


LLAMA_3_8B = Shape(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, hidden=4096, intermediate=14336)
MOE_SHAPES = {"Mixtral-8x7B": MoeShape(num_experts=8, top_k=2, hidden=4096, intermediate=14336),
              "Qwen3-30B-A3B": MoeShape(num_experts=128, top_k=8, hidden=2048, intermediate=768)}
FULL_SWEEP = Sweep((64, 128, 256), (1024, 2048, 4096, 8192), 4096, (256, 4096), (1, 64, 4096), 2**30, 8192)


class Setup(NamedTuple):
    """What every benchmark function needs: the ops, and the shapes and device to time them at."""
    ops: KernelOps
    dtype: torch.dtype
    device: str
    shape: Shape
    sweep: Sweep
    limits: Limits


def fused_moe_traffic(num_tokens: int, num_experts_hit: int, shape: MoeShape, elem: int) -> Traffic:
    """Hidden states in and out, the weights of every expert some token goes to (read once), the routing
    (fp32 weight and int64 id per pair); 2 FLOPs per multiply-add of the gate_up and down GEMMs of every pair."""
    weights = num_experts_hit * 3 * shape.hidden * shape.intermediate * elem
    routing = num_tokens * shape.top_k * (FP32 + INT64)
    flops = 2 * num_tokens * shape.top_k * 3 * shape.hidden * shape.intermediate
    return Traffic(2 * num_tokens * shape.hidden * elem + weights + routing, flops)


def _record(kernel: str, shape: dict, dtype: torch.dtype, seconds: float, traffic: Traffic, limits: Limits,
            sdpa_seconds: float | None = None) -> dict:
    gbps = traffic.bytes / seconds / 1e9
    tflops = traffic.flops / seconds / 1e12
    return {"kernel": kernel, "batch": None, "context_len": None, "num_heads": None, "num_kv_heads": None,
            "head_dim": None, "block_size": None, **shape, "dtype": str(dtype).removeprefix("torch."),
            "time_us": seconds * 1e6, "gbps": gbps, "tflops": tflops,
            "frac_of_copy_bw": gbps / limits.copy_bw_gbps, "frac_of_matmul": tflops / limits.matmul_tflops,
            "frac_of_sdpa": None if sdpa_seconds is None else sdpa_seconds / seconds}


def _paged_cache(setup: Setup, batch: int, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache with every sequence's blocks scattered over it (a shuffled block table)."""
    s = setup.shape
    blocks_per_seq = math.ceil(context_len / s.block_size)
    kv_cache = torch.randn(2, batch * blocks_per_seq, s.block_size, s.num_kv_heads, s.head_dim, dtype=setup.dtype,
                           device=setup.device)
    block_tables = torch.randperm(batch * blocks_per_seq, device=setup.device).to(torch.int32).view(batch, -1)
    return kv_cache, block_tables


def _dense_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor,
              context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same keys and values as SDPA wants them: [batch, num_kv_heads, context_len, head_dim]."""
    kv = kv_cache[:, block_tables.long()].flatten(2, 3)[:, :, :context_len].transpose(2, 3).contiguous()
    return kv[0], kv[1]


def _attention_shape(setup: Setup, batch: int, context_len: int) -> dict:
    s = setup.shape
    return {"batch": batch, "context_len": context_len, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim, "block_size": s.block_size}


def _decode_inputs(setup: Setup, batch: int,
                   context_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_cache, block_tables, seq_lens, query, out) of a decode batch whose sequences all hold context_len keys."""
    s = setup.shape
    kv_cache, block_tables = _paged_cache(setup, batch, context_len)
    seq_lens = torch.full((batch,), context_len, dtype=torch.int32, device=setup.device)
    query = torch.randn(batch, s.num_heads, s.head_dim, dtype=setup.dtype, device=setup.device)
    return kv_cache, block_tables, seq_lens, query, torch.empty_like(query)


def bench_decode(setup: Setup, progress: Callable[[str], None] = lambda _: None) -> list[dict]:
    s, records = setup.shape, []
    for batch in setup.sweep.decode_batches:
        for context_len in setup.sweep.decode_contexts:
            progress(f"decode attention, batch {batch}, context {context_len}")
            kv_cache, block_tables, seq_lens, query, out = _decode_inputs(setup, batch, context_len)
            scale = s.head_dim ** -0.5
            seconds = bench_seconds(lambda: setup.ops.paged_decode_attention(
                query, kv_cache, block_tables, seq_lens, 0, batch, scale, context_len, out=out), setup.device)
            key, value = _dense_kv(kv_cache, block_tables, context_len)
            del kv_cache
            q = query[:, :, None]
            sdpa_seconds = bench_seconds(
                lambda: F.scaled_dot_product_attention(q, key, value, scale=scale, enable_gqa=True), setup.device)
            del key, value
            traffic = decode_traffic(batch, context_len, s.num_heads, s.num_kv_heads, s.head_dim, s.block_size,
                                     query.element_size())
            records.append(_record("paged_decode_attention", _attention_shape(setup, batch, context_len),
                                   setup.dtype, seconds, traffic, setup.limits, sdpa_seconds))
            _free_cache(setup.device)
    return records


def bench_decode_splits(setup: Setup, progress: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Small-batch decode attention (stage 1 and the merge) at every split count, for each of sweep.split_batches
    and sweep.split_contexts: the data that tunes choose_num_splits (MIN_SPLIT_TOKENS), the split count of eager
    and mixed steps (a CUDA graph's is fixed at capture, for max_model_len). The record of the count
    choose_num_splits picks says so (eager_choice). Triton kernels only."""
    s, records = setup.shape, []
    for batch in setup.sweep.split_batches:
        for context_len in setup.sweep.split_contexts:
            progress(f"decode attention, batch {batch}, context {context_len}, 1 to {MAX_SPLITS} splits")
            kv_cache, block_tables, seq_lens, query, out = _decode_inputs(setup, batch, context_len)
            traffic = decode_traffic(batch, context_len, s.num_heads, s.num_kv_heads, s.head_dim, s.block_size,
                                     query.element_size())
            chosen = choose_num_splits(batch * s.num_kv_heads, context_len, query.device)
            for num_splits in sorted({2 ** k for k in range(MAX_SPLITS.bit_length())} | {chosen}):
                seconds = bench_seconds(lambda: decode_with_splits(query, kv_cache, block_tables, seq_lens, 0, batch,
                                                                   s.head_dim ** -0.5, None, num_splits, out=out),
                                        setup.device)
                shape = _attention_shape(setup, batch, context_len) | {"num_splits": num_splits,
                                                                       "eager_choice": num_splits == chosen}
                records.append(_record("decode_attention_splits", shape, setup.dtype, seconds, traffic, setup.limits))
            _free_cache(setup.device)
    return records


def bench_gemv(setup: Setup, progress: Callable[[str], None] = lambda _: None) -> list[dict]:
    """The dense layers' matmuls at the decode batches the engine tunes (kernels/gemv.py's ROW_BUCKETS): cuBLAS
    (torch's linear) against gemv in every config that takes the batch, on the same x and weight (gemv.compare,
    as the engine's warm-up, timed by bench_seconds); each record says how far its output is from cuBLAS's
    (max_abs_diff)."""
    s, dtype, device, records = setup.shape, setup.dtype, setup.device, []
    elem = torch.finfo(dtype).bits // 8
    layers = {"qkv": ((s.num_heads + 2 * s.num_kv_heads) * s.head_dim, s.hidden),
              "o": (s.hidden, s.num_heads * s.head_dim), "gate_up": (2 * s.intermediate, s.hidden),
              "down": (s.hidden, s.intermediate)}
    for layer, (n, k) in layers.items():
        weight = torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5
        for rows in setup.sweep.gemv_rows:
            progress(f"decode matmul {layer} ({n} x {k}), {rows} rows: cuBLAS and gemv")
            x = torch.randn(rows, k, dtype=dtype, device=device)
            shape, traffic = {"layer": layer, "batch": rows, "n": n, "k": k}, linear_traffic(rows, k, n, elem)
            comparison = gemv.compare(x, weight, None, lambda fn: 1e3 * bench_seconds(fn, device))
            records.append(_record("linear_cublas", shape, dtype, comparison.cublas_ms / 1e3, traffic, setup.limits)
                           | {"max_abs_diff": 0.0})
            for config, ms in comparison.gemv_ms.items():
                records.append(_record("gemv", shape | {"config": config._asdict()}, dtype, ms / 1e3, traffic,
                                       setup.limits) | {"max_abs_diff": comparison.max_abs_diff[config]})
        del weight
        _free_cache(device)
    return records


def bench_prefill(setup: Setup, progress: Callable[[str], None] = lambda _: None) -> list[dict]:
    """One prompt of prefill_tokens against SDPA's flash backend on the same (dense) keys and values, repeated to
    every query head: flash reads them per head, which costs nothing here since a prefill is compute-bound."""
    s, tokens, device = setup.shape, setup.sweep.prefill_tokens, setup.device
    progress(f"prefill attention, {tokens} tokens")
    kv_cache, block_tables = _paged_cache(setup, 1, tokens)
    seq_lens = torch.tensor([tokens], dtype=torch.int32, device=device)
    query_start_loc = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    query = torch.randn(tokens, s.num_heads, s.head_dim, dtype=setup.dtype, device=device)
    out = torch.empty_like(query)
    scale = s.head_dim ** -0.5
    seconds = bench_seconds(lambda: setup.ops.prefill_attention(query, kv_cache, block_tables, seq_lens,
                                                                query_start_loc, 0, 1, scale, tokens, out=out),
                            device)
    key, value = (t.repeat_interleave(s.num_heads // s.num_kv_heads, dim=1)
                  for t in _dense_kv(kv_cache, block_tables, tokens))
    q = query.transpose(0, 1)[None].contiguous()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa_seconds = bench_seconds(
            lambda: F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=scale), device)
    traffic = prefill_traffic(0, tokens, s.num_heads, s.num_kv_heads, s.head_dim, s.block_size, query.element_size())
    return [_record("prefill_attention", _attention_shape(setup, 1, tokens), setup.dtype, seconds, traffic,
                    setup.limits, sdpa_seconds)]


def bench_elementwise(setup: Setup, progress: Callable[[str], None] = lambda _: None) -> list[dict]:
    """RMSNorm(+residual), rotary with the cache write, and SiLU-and-mul at a decode batch and a prefill chunk."""
    s, ops, dtype, device = setup.shape, setup.ops, setup.dtype, setup.device
    elem = torch.finfo(dtype).bits // 8
    records = []

    def record(kernel: str, shape: dict, fn: Callable[[], object], traffic: Traffic) -> None:
        records.append(_record(kernel, shape, dtype, bench_seconds(fn, device), traffic, setup.limits))

    for tokens in setup.sweep.elementwise_tokens:
        progress(f"norm, rotary and KV write, SiLU-and-mul, {tokens} tokens")
        x, residual = (torch.randn(tokens, s.hidden, dtype=dtype, device=device) for _ in range(2))
        weight = torch.randn(s.hidden, dtype=dtype, device=device)
        record("rms_norm", {"batch": tokens, "hidden": s.hidden}, lambda: ops.rms_norm(x, weight, 1e-5, residual),
               rms_norm_traffic(tokens, s.hidden, elem))
        query = torch.randn(tokens, s.num_heads, s.head_dim, dtype=dtype, device=device)
        key, value = (torch.randn(tokens, s.num_kv_heads, s.head_dim, dtype=dtype, device=device) for _ in range(2))
        positions = torch.randint(0, 8192, (tokens,), device=device)
        # cos^2 + sin^2 = 1: the query, rotated again each repeat, stays finite
        angles = torch.rand(8192, s.head_dim // 2, device=device) * 6.3
        cos_sin_cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
        kv_cache = torch.empty(2, tokens // s.block_size * 4, s.block_size, s.num_kv_heads, s.head_dim, dtype=dtype,
                               device=device)
        slots = torch.randperm(kv_cache.shape[1] * s.block_size, device=device)[:tokens]
        heads = {"batch": tokens, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                 "block_size": s.block_size}
        record("rotary_embedding_and_write_kv", heads,
               lambda: ops.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin_cache, kv_cache, slots),
               rotary_write_kv_traffic(tokens, s.num_heads, s.num_kv_heads, s.head_dim, elem))
        gate_up = torch.randn(tokens, 2 * s.intermediate, dtype=dtype, device=device)
        record("silu_and_mul", {"batch": tokens, "intermediate": s.intermediate}, lambda: ops.silu_and_mul(gate_up),
               silu_and_mul_traffic(tokens, s.intermediate, elem))
    return records


def bench_fused_moe(setup: Setup, shapes: dict[str, MoeShape],
                    progress: Callable[[str], None] = lambda _: None) -> list[dict]:
    """fused_moe at each model's shape for each token count of the sweep, tokens routed to random experts."""
    dtype, device, records = setup.dtype, setup.device, []
    elem = torch.finfo(dtype).bits // 8
    for model, s in shapes.items():
        w13 = torch.randn(s.num_experts, 2 * s.intermediate, s.hidden, dtype=dtype, device=device)
        w2 = torch.randn(s.num_experts, s.hidden, s.intermediate, dtype=dtype, device=device)
        for tokens in setup.sweep.moe_tokens:
            progress(f"fused MoE, {model} shape, {tokens} tokens")
            hidden = torch.randn(tokens, s.hidden, dtype=dtype, device=device)
            scores = torch.rand(tokens, s.num_experts, device=device)
            topk_weights, topk_ids = scores.softmax(dim=-1).topk(s.top_k, dim=-1)
            seconds = bench_seconds(lambda: setup.ops.fused_moe(hidden, w13, w2, topk_weights, topk_ids), device)
            traffic = fused_moe_traffic(tokens, topk_ids.unique().numel(), s, elem)
            records.append(_record("fused_moe", {"model": model, "batch": tokens, **s._asdict()}, dtype, seconds,
                                   traffic, setup.limits))
        del w13, w2
        _free_cache(device)
    return records


def bench_all(setup: Setup, progress: Callable[[str], None] = lambda _: None) -> list[dict]:
    return [record for bench in (bench_decode, bench_decode_splits, bench_prefill, bench_elementwise, bench_gemv)
            for record in bench(setup, progress)]


def _free_cache(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _print_table(records: list[dict]) -> None:
    print(f"{'kernel':<32}{'batch':>6}{'ctx':>6}{'splits':>7}{'time_us':>10}{'GB/s':>8}{'TFLOP/s':>9}{'of_copy':>8}"
          f"{'vs_sdpa':>8}")
    for r in records:
        sdpa = "" if r["frac_of_sdpa"] is None else f"{r['frac_of_sdpa']:.2f}"
        splits = "" if "num_splits" not in r else f"{r['num_splits']}{'*' if r['eager_choice'] else ''}"
        print(f"{r['kernel']:<32}{r['batch']:>6}{r['context_len'] or '':>6}{splits:>7}{r['time_us']:>10.1f}"
              f"{r['gbps']:>8.0f}{r['tflops']:>9.1f}{r['frac_of_copy_bw']:>8.2f}{sdpa:>8}")
    print("splits: * the count eager steps pick (choose_num_splits)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py times the Triton kernels on a CUDA GPU, and this machine has none.")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    limits = measure_limits("cuda", FULL_SWEEP)
    setup = Setup(get_ops("triton"), dtype, "cuda", LLAMA_3_8B, FULL_SWEEP, limits)
    records = bench_all(setup) + bench_fused_moe(setup, MOE_SHAPES)
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
