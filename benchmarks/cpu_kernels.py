"""The CPU's C kernels (kernels/cpu_ops.py, kernel_backend="cpu") against the PyTorch reference they replace
(kernels/reference.py), per call at SmolLM2-135M's shapes (9 query heads, 3 KV heads, head_dim 64, hidden 576),
in the same run, alternating. Prints one JSON object: microseconds per call (best of --repeat) and the ratios.
In bf16 also the matmuls of one step (SmolLM2's 30 layers and its lm_head, 270 MB of weights: more than the
caches hold, so they stream from memory as in the engine) at 1, 4, 16 and 32 rows (decode steps) and 128 (a short
prefill), the C side on weights packed as the engine packs them, with the weight bytes per second; and one
layer's (gate_up_proj) at a prefill chunk's 512 and 2048 rows.

    python -m benchmarks.cpu_kernels [--dtype bfloat16] [--threads N] [--output]

Run it on an idle machine: with other jobs on the cores, OpenMP barriers in both paths wait for descheduled
threads. Inside the engine the KV cache is colder than here (the matmuls between layers evict it), so decode
attention takes longer there than these calls do.
"""
from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import machine_info
from kernels import cpu_ops, reference

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, BLOCK_SIZE = 9, 3, 64, 576, 16
DECODE_CASES = [(1, 1024), (32, 200), (64, 512), (256, 512), (16, 2048)]  # (sequences, longest context)
TOKEN_COUNTS = [1, 32, 256]
LAYERS, INTERMEDIATE, VOCAB = 30, 1536, 49152
LINEAR_ROWS = [1, 4, 16, 32, 128]  # decode steps, and a short prefill
PREFILL_ROWS = [512, 2048]


def _best_us(fn: Callable[[], object], repeat: int) -> float:
    number = 5
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def _decode_args(num_seqs: int, context: int, dtype: torch.dtype) -> tuple:
    """A shuffled paged cache whose sequences hold between half and all of `context` tokens."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    kv_cache = torch.randn(2, num_seqs * blocks_per_seq + 3, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(dtype)
    tables = torch.randperm(kv_cache.shape[1])[:num_seqs * blocks_per_seq].view(num_seqs, -1).to(torch.int32)
    seq_lens = torch.randint(max(1, context // 2), context + 1, (num_seqs,), dtype=torch.int32)
    query = torch.randn(num_seqs, HEADS, HEAD_DIM).to(dtype)
    return (query, kv_cache, tables, seq_lens, 0, num_seqs, HEAD_DIM ** -0.5, int(seq_lens.max()))


def _compare(name: str, ours: Callable[[], object], theirs: Callable[[], object], repeat: int) -> dict:
    times = {"reference_us": [], "c_us": []}
    for _ in range(3):  # alternate, so drift on the machine falls on both
        times["reference_us"].append(_best_us(theirs, repeat))
        times["c_us"].append(_best_us(ours, repeat))
    row = {key: round(min(values), 1) for key, values in times.items()}
    row["speedup"] = round(row["reference_us"] / row["c_us"], 2)
    print(f"{name}: reference {row['reference_us']} us, C {row['c_us']} us, {row['speedup']}x", flush=True)
    return row


def _compare_step_matmuls(repeat: int) -> dict:
    """The matmuls of a step of `rows` tokens through SmolLM2-135M's shapes, C against torch's."""
    qkv = HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM
    shapes = [(qkv, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    weights = [torch.randn(shape).bfloat16() for _ in range(LAYERS) for shape in shapes]
    weights.append(torch.randn(VOCAB, HIDDEN).bfloat16())
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    packed = [cpu_ops.pack_linear_weight(weight) for weight in weights]
    results = {}
    for rows in LINEAR_ROWS:
        inputs = {width: torch.randn(rows, width).bfloat16() for width in (HIDDEN, INTERMEDIATE)}

        def step(linear: Callable, laid_out: list[torch.Tensor]) -> None:
            for weight, as_read in zip(weights, laid_out):
                linear(inputs[weight.shape[1]], as_read)
        row = _compare(f"a step's matmuls, {rows} rows", lambda: step(cpu_ops.linear, packed),
                       lambda: step(reference.linear, weights), max(1, repeat // 5))
        row |= {f"{side}_weight_gb_s": round(weight_bytes / row[f"{side}_us"] / 1e3, 1) for side in ("reference", "c")}
        results[f"step matmuls, {rows} rows"] = row
    weight = weights[2]  # gate_up_proj: a prefill chunk's largest matmul, each call long enough to time alone
    for rows in PREFILL_ROWS:
        x = torch.randn(rows, HIDDEN).bfloat16()
        results[f"gate_up matmul, {rows} rows"] = _compare(
            f"gate_up matmul, {rows} rows", lambda: cpu_ops.linear(x, packed[2]), lambda: reference.linear(x, weight),
            max(1, repeat // 5))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--output", nargs="?", const="", help="write the JSON here (alone: benchmarks/results/"
                        "cpu-kernels-<dtype>-<date>.json)")
    args = parser.parse_args()
    if not cpu_ops.available():
        raise SystemExit("the C kernels did not build here (no C compiler?): nothing to compare")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    results = {}
    for num_seqs, context in DECODE_CASES:
        decode = _decode_args(num_seqs, context, dtype)
        out = torch.empty_like(decode[0])
        results[f"paged_decode_attention {num_seqs} seqs, context <= {context}"] = _compare(
            f"decode attention, {num_seqs} x {context}", lambda: cpu_ops.paged_decode_attention(*decode, out=out),
            lambda: reference.paged_decode_attention(*decode, out=out), args.repeat)
    for tokens in TOKEN_COUNTS:
        x, residual = torch.randn(tokens, HIDDEN).to(dtype), torch.randn(tokens, HIDDEN).to(dtype)
        weight = torch.randn(HIDDEN).to(dtype)
        results[f"rms_norm with residual, {tokens} tokens"] = _compare(
            f"rms_norm + residual, {tokens} tokens", lambda: cpu_ops.rms_norm(x, weight, 1e-5, residual),
            lambda: reference.rms_norm(x, weight, 1e-5, residual), args.repeat)
        qkv = torch.randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM).to(dtype)
        query, key = qkv[:, :HEADS], qkv[:, HEADS:HEADS + KV_HEADS]
        angles = torch.rand(2048, HEAD_DIM // 2) * 6.28  # a real table: repeated rotations keep the norm
        cos_sin, positions = torch.cat((angles.cos(), angles.sin()), -1), torch.randint(0, 2048, (tokens,))
        cache = torch.zeros(2, 64, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(dtype)
        slots = torch.randperm(cache[0].numel() // (KV_HEADS * HEAD_DIM))[:tokens]
        value = qkv[:, HEADS + KV_HEADS:]
        results[f"rotary_embedding_and_write_kv, {tokens} tokens"] = _compare(
            f"rotary and KV write, {tokens} tokens",
            lambda: cpu_ops.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin, cache, slots),
            lambda: reference.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin, cache, slots),
            args.repeat)
    if dtype == torch.bfloat16 and cpu_ops.linear_available():
        results |= _compare_step_matmuls(args.repeat)
    report = {"dtype": args.dtype, "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                              "hidden": HIDDEN, "block_size": BLOCK_SIZE},
              "machine": machine_info("cpu") | {"torch_threads": torch.get_num_threads()}, "results": results}
    print(json.dumps(report, indent=2))
    if args.output is not None:
        path = Path(args.output or f"benchmarks/results/cpu-kernels-{args.dtype}-{report['machine']['date'][:10]}.json")
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
