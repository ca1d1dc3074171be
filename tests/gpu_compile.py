"""Cross-compiles, on a machine without a GPU, every Triton kernel variant the engine launches, for real CUDA GPUs.

The interpreter (TRITON_INTERPRET=1) runs a kernel's Python and accepts what a GPU compile refuses (a plain Python
global inside a kernel, a type error in code the tests never reach, a layout the backend cannot lower). Triton
compiles for a GPUTarget without needing one: this module records the launches of one layer of several model
families' published shapes, as the engine makes them (kernels/triton_ops.py, kernels not run), and compiles each
distinct variant through ttir, ttgir, llir, ptx and ptxas to a cubin, as Triton's JIT would on that GPU.

It must run in a process without TRITON_INTERPRET (under it the kernels are not JITFunctions):
`python -m tests.gpu_compile` prints one JSON line per (variant, target); tests/test_kernels_compile_for_gpu.py
runs it.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from kernels import gemv, triton_ops
from tests.kernel_launches import H100, Launch, recorded_launch_args

A100 = GPUTarget("cuda", 80, 32)
# Shared memory a block may opt into: a kernel needing more compiles but fails to launch ("out of resource").
MAX_SHARED_BYTES = {90: 232448, 80: 166912}
BLOCK_SIZE = 16  # EngineConfig's default
MAX_EXPERT_WIDTH = 512  # expert matrices cut to this (their widths' divisibility by 16, all a variant sees, kept)


class Family(NamedTuple):
    """One layer's shape, as published for the model named."""
    name: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    activation: str = "silu_and_mul"
    norm_offset: float = 0.0  # Gemma's 1 + weight
    qk_norm: str | None = None  # "head": per head (Qwen3, Gemma 3); "all": over all heads (OLMoE)
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    rotary_dim: int | None = None  # partial rotary (Phi-4-mini)
    num_experts: int = 0
    top_k: int = 0


FAMILIES = (
    Family("llama-3-8b", 4096, 32, 8, 128, 14336),
    Family("qwen3-8b", 4096, 32, 8, 128, 12288, qk_norm="head"),
    Family("gemma-2-9b", 3584, 16, 8, 256, 14336, "gelu_tanh_and_mul", 1.0, sliding_window=4096,
           logits_soft_cap=50.0),
    Family("gemma-3-4b", 2560, 8, 4, 256, 10240, "gelu_tanh_and_mul", 1.0, qk_norm="head", sliding_window=1024),
    Family("phi-3-mini", 3072, 32, 32, 96, 8192),
    Family("phi-4-mini", 3072, 24, 8, 128, 8192, rotary_dim=96),
    Family("mixtral-8x7b", 4096, 32, 8, 128, 14336, num_experts=8, top_k=2),
    Family("qwen3-30b-a3b", 2048, 32, 4, 128, 768, qk_norm="head", num_experts=128, top_k=8),
    Family("olmoe-1b-7b", 2048, 16, 16, 128, 1024, qk_norm="all", num_experts=64, top_k=8),
)

# (dtype, families, targets): bf16 (the engine's dtype on a GPU) for every family on the H100; the families that
# together launch every kernel and flag (Gemma 2: head_dim 256, soft cap, GeGLU; Qwen3-MoE: per-head norms, the
# MoE kernels) on the A100 too, in fp32 (exact "ieee" dots, twice the shared memory), and one of them in fp16.
GEMMA_2, QWEN3_MOE = FAMILIES[2], FAMILIES[7]
PLAN = (
    (torch.bfloat16, FAMILIES, (H100,)),
    (torch.bfloat16, (GEMMA_2, QWEN3_MOE), (A100,)),
    (torch.float32, (GEMMA_2, QWEN3_MOE), (H100,)),
    (torch.float16, (QWEN3_MOE,), (H100,)),
)

# One decode step's batch, with a prefill: short contexts decoded in one split, a long one in several, a chunk.
SHORT_CONTEXTS, LONG_CONTEXT, PREFILL = [40] * 16, 2000, (100, 64)


def record_layer(family: Family, dtype: torch.dtype) -> dict[tuple, Launch]:
    """Every kernel variant one layer of `family` launches in a mixed decode and prefill step, and in a decode
    step small enough for the MoE's small blocks."""
    with recorded_launch_args(then_run=False) as launches:
        _attention_launches(family, dtype)
        _mlp_launches(family, dtype, num_tokens=len(SHORT_CONTEXTS) + 1 + PREFILL[1])
        if family.num_experts:
            _mlp_launches(family, dtype, num_tokens=1)
        if dtype != torch.float32:  # gemv is tuned for 16-bit weights only
            _gemv_launches(family, dtype)
    return launches


def _gemv_launches(f: Family, dtype: torch.dtype) -> None:
    """The qkv projection at decode batches in every config tune may choose, without and with a bias (Qwen2's)."""
    weight = torch.empty((f.num_heads + 2 * f.num_kv_heads) * f.head_dim, f.hidden, dtype=dtype)
    for config in gemv.CONFIGS:
        for bias in (None, torch.empty(weight.shape[0], dtype=dtype)):
            gemv.gemv(torch.empty(1, f.hidden, dtype=dtype), weight, bias, config)


def _attention_launches(f: Family, dtype: torch.dtype) -> None:
    ops = triton_ops
    chunks = [(n - 1, 1) for n in SHORT_CONTEXTS] + [(LONG_CONTEXT - 1, 1), PREFILL]
    lens = [prefix + q_len for prefix, q_len in chunks]
    num_tokens, num_decodes = sum(q_len for _, q_len in chunks), len(chunks) - 1
    blocks_per_seq = -(-max(lens) // BLOCK_SIZE)
    kv_cache = torch.empty(2, blocks_per_seq, BLOCK_SIZE, f.num_kv_heads, f.head_dim, dtype=dtype)
    block_tables = torch.zeros(len(lens), blocks_per_seq, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    query_start_loc = torch.tensor([0] + [q_len for _, q_len in chunks], dtype=torch.int32).cumsum(0).to(torch.int32)
    positions = torch.zeros(num_tokens, dtype=torch.int64)
    slots = torch.zeros(num_tokens, dtype=torch.int64)

    x = torch.empty(num_tokens, f.hidden, dtype=dtype)
    norm_weight = torch.empty(f.hidden, dtype=dtype)
    ops.rms_norm(x, norm_weight, 1e-6, None, f.norm_offset)
    ops.rms_norm(x, norm_weight, 1e-6, x, f.norm_offset)
    q_size, kv_size = f.num_heads * f.head_dim, f.num_kv_heads * f.head_dim
    qkv = torch.empty(num_tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    if f.qk_norm == "all":
        q, k = (ops.rms_norm(t, torch.empty(t.shape[-1], dtype=dtype), 1e-6) for t in (q, k))
    q, k, v = (t.view(num_tokens, -1, f.head_dim) for t in (q, k, v))
    norm = {}
    if f.qk_norm == "head":  # normalised with the rotation, in the same kernel
        head_weight = torch.empty(f.head_dim, dtype=dtype)
        norm = {"q_norm_weight": head_weight, "k_norm_weight": head_weight, "norm_eps": 1e-6,
                "norm_weight_offset": f.norm_offset}
    ops.rotary_embedding_and_write_kv(positions, q, k, v, torch.empty(8192, f.rotary_dim or f.head_dim), kv_cache,
                                      slots, True, **norm)
    out = torch.empty_like(q)
    attention = (kv_cache, block_tables, seq_lens)
    scale = f.head_dim ** -0.5
    # Windowed families (Gemma 2 and 3) alternate windowed and global layers: the window's specialization differs.
    for window in dict.fromkeys((f.sliding_window, None)):
        options = (window, f.logits_soft_cap)
        ops.paged_decode_attention(q, *attention, 0, len(SHORT_CONTEXTS), scale, max(SHORT_CONTEXTS), *options,
                                   out=out)
        ops.paged_decode_attention(q, *attention, len(SHORT_CONTEXTS), num_decodes, scale, LONG_CONTEXT, *options,
                                   out=out)
        ops.prefill_attention(q, *attention, query_start_loc, num_decodes, len(lens), scale, lens[-1], *options,
                              out=out)


def _mlp_launches(f: Family, dtype: torch.dtype, num_tokens: int) -> None:
    x = torch.empty(num_tokens, f.hidden, dtype=dtype)
    if not f.num_experts:
        getattr(triton_ops, f.activation)(torch.empty(num_tokens, 2 * f.intermediate, dtype=dtype))
        return
    width = min(f.intermediate, MAX_EXPERT_WIDTH)
    w13 = torch.empty(f.num_experts, 2 * width, f.hidden, dtype=dtype)
    w2 = torch.empty(f.num_experts, f.hidden, width, dtype=dtype)
    topk_weights = torch.empty(num_tokens, f.top_k, dtype=torch.float32)
    topk_ids = torch.zeros(num_tokens, f.top_k, dtype=torch.int64)
    triton_ops.fused_moe(x, w13, w2, topk_weights, topk_ids)


class Variant(NamedTuple):
    """What Triton's JIT would hand to triton.compile for one launch on one target (picklable)."""
    kernel: str  # "module:function"
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    arch: int


def variant(launch: Launch, target: GPUTarget) -> Variant:
    """The JIT's own binding and packing of a launch's arguments (triton.runtime.jit.JITFunction.run)."""
    backend, jit = make_backend(target), launch.kernel
    bind = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = bind(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, launch.kwargs, bound_args, specialization,
                                                           options)
    return Variant(f"{jit.fn.__module__}:{jit.fn.__name__}", signature, constexprs, attrs, options.__dict__,
                   target.arch)


def variants() -> Iterator[Variant]:
    """Each distinct variant of the PLAN once per target."""
    for dtype, families, targets in PLAN:
        launches = {}
        for family in families:
            launches.update(record_layer(family, dtype))
        for launch in launches.values():
            for target in targets:
                yield variant(launch, target)


def compile_variant(v: Variant) -> dict:
    """One variant compiled to a cubin: its shared memory, or the compiler's error."""
    module, name = v.kernel.split(":")
    kernel = getattr(importlib.import_module(module), name)
    result = {"kernel": name, "arch": v.arch, "signature": v.signature,
              "constexprs": {str(k): repr(c) for k, c in v.constexprs.items()}}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, v.signature, v.constexprs, v.attrs),
                                  target=GPUTarget("cuda", v.arch, 32), options=v.options)
        result.update(shared=compiled.metadata.shared, max_shared=MAX_SHARED_BYTES[v.arch], error=None)
    except Exception as error:  # noqa: BLE001 (the report carries every failure)
        result.update(error=f"{type(error).__name__}: {error}")
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def main() -> None:
    assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET: the kernels must be JITFunctions"
    distinct = {repr(v): v for v in variants()}.values()
    with ProcessPoolExecutor(max_workers=min(len(os.sched_getaffinity(0)), 4)) as pool:
        for result in pool.map(compile_variant, distinct):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
