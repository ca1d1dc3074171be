"""Host time per call of Triton launchers, plain, through their torch.library ops (kernels/triton_ops.py), and
through the same launchers registered with torch.library.custom_op instead, every kernel launch a no-op: what the
dispatch adds to an eager step. Runs on a CPU:
`TRITON_INTERPRET=1 python -m benchmarks.op_dispatch`. On a GPU each real launch adds Triton's own host cost
(binding, cache lookup, driver launch), the same on both paths."""
from __future__ import annotations

import timeit
from collections.abc import Callable

import torch
from torch.library import custom_op

from kernels import activation, compile_count, decode_attention, rmsnorm, rope, triton_ops


def _per_call_us(fn: Callable[[], object], number: int = 2000, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    kernels = [function for _, _, function in compile_count.jit_functions()]
    for kernel in kernels:
        kernel.run = lambda *args, **kwargs: None
    x = torch.randn(4, 512)
    weight = torch.ones(256)
    key, positions, cos_sin = torch.randn(4, 2, 64), torch.arange(4), torch.randn(16, 64)
    kv_cache = torch.zeros(2, 8, 16, 2, 64)
    slots = torch.arange(4)
    query, out = torch.randn(4, 8, 64), torch.empty(4, 8, 64)
    tables, seq_lens = torch.zeros(4, 8, dtype=torch.int32), torch.full((4,), 20, dtype=torch.int32)
    silu = custom_op("tokmodel_bench::silu_and_mul", activation.silu_and_mul, mutates_args=())
    norm = custom_op("tokmodel_bench::rms_norm", triton_ops._rms_norm, mutates_args=())
    write = custom_op("tokmodel_bench::rotary_embedding_and_write_kv", rope.rotary_embedding_and_write_kv,
                      mutates_args=("query", "kv_cache"))
    decode = custom_op("tokmodel_bench::paged_decode_attention", triton_ops._paged_decode_attention,
                       mutates_args=("out",))
    decode_args = (kv_cache, tables, seq_lens, 0, 4, 0.125, 20)
    cases = {
        "silu_and_mul": (lambda: activation.silu_and_mul(x), lambda: triton_ops.silu_and_mul(x), lambda: silu(x)),
        "rms_norm": (lambda: rmsnorm.rms_norm(x[:, :256], weight, 1e-6),
                     lambda: triton_ops.rms_norm(x[:, :256], weight, 1e-6),
                     lambda: norm(x[:, :256], weight, 1e-6, 0.0)),
        "rotary_embedding_and_write_kv": (
            lambda: rope.rotary_embedding_and_write_kv(positions, query, key, key, cos_sin, kv_cache, slots),
            lambda: triton_ops.rotary_embedding_and_write_kv(positions, query, key, key, cos_sin, kv_cache, slots),
            lambda: write(positions, query, key, key, cos_sin, kv_cache, slots)),
        "paged_decode_attention": (
            lambda: decode_attention.paged_decode_attention(query, *decode_args, out=out),
            lambda: triton_ops.paged_decode_attention(query, *decode_args, out=out),
            lambda: decode(out, query, *decode_args, None, None)),
    }
    try:
        with torch.inference_mode():  # as the model runner calls them
            print(f"{'us per call':<32}{'plain':>8}{'tokmodel op':>13}{'custom_op':>11}")
            for name, calls in cases.items():
                print(f"{name:<32}" + "".join(f"{_per_call_us(call):>{width}.1f}"
                                              for call, width in zip(calls, (8, 13, 11))))
    finally:
        for kernel in kernels:
            del kernel.run


if __name__ == "__main__":
    main()
