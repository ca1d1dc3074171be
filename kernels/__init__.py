"""Kernels for the model's hot path, behind one small API chosen once per engine.

Every op exists twice with one signature: a Triton kernel (kernel_backend="triton", registered as the torch.library
op torch.ops.tokmodel.<name> in kernels/triton_ops.py) and the PyTorch reference in kernels/reference.py
(kernel_backend="torch"). kernel_backend="cpu" is the reference with the ops a compiled C kernel does faster on a
CPU (kernels/cpu_ops.py). `linear` (the dense layers' matmul) is torch's, but on the CPU, where a C kernel reads
bf16 weights that `pack_linear_weight` put in its layout once they were loaded (elsewhere that returns the weight
as it is), and on the Triton backend at decode batches where `tune_linear` (at warm-up, on the model's weights)
measured kernels/gemv.py faster than cuBLAS; `embedding` looks rows up in such a weight (a tied LM head's).
Kernels know only tensors.
"""
from __future__ import annotations

from typing import Callable, NamedTuple


class KernelOps(NamedTuple):
    rotary_embedding_and_write_kv: Callable
    paged_decode_attention: Callable
    prefill_attention: Callable
    rms_norm: Callable
    silu_and_mul: Callable
    gelu_tanh_and_mul: Callable
    fused_moe: Callable
    linear: Callable
    tune_linear: Callable
    pack_linear_weight: Callable
    embedding: Callable


def get_ops(backend: str) -> KernelOps:
    if backend == "torch":
        from kernels import reference as impl
    elif backend == "triton":
        from kernels import triton_ops as impl
    elif backend == "cpu":
        from kernels import cpu_ops as impl
    else:
        raise ValueError(f"kernel_backend must be 'torch', 'triton' or 'cpu', got {backend!r}")
    return KernelOps(**{name: getattr(impl, name) for name in KernelOps._fields})
