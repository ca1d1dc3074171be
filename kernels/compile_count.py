"""How many variants of TokModel's Triton kernels this process has compiled: the GPU check that serving
compiles nothing after warm-up (a compile takes seconds on a GPU and stalls every request in the step).

Triton's JITFunction keeps, per device, a cache of the kernels compiled for each specialization of its
arguments. Under the interpreter (TRITON_INTERPRET=1) nothing is compiled and every count is 0.
"""
from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

from triton.runtime import KernelInterface
from triton.runtime.jit import JITFunction

from kernels import activation, decode_attention, fused_moe, gemv, prefill_attention, rmsnorm, rope

KERNEL_MODULES: tuple[ModuleType, ...] = (activation, decode_attention, fused_moe, gemv, prefill_attention, rmsnorm,
                                          rope)


def jit_functions() -> Iterator[tuple[ModuleType, str, KernelInterface]]:
    """(module, name, function) of every @triton.jit function defined in the kernel modules, launched or called
    from a kernel (those compile into their callers and have no variants of their own)."""
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if isinstance(value, KernelInterface) and value.fn.__module__ == module.__name__:
                yield module, name, value


def compiled_variants() -> dict[str, int]:
    """Compiled variants so far of each kernel, by "module.function", over all devices."""
    return {f"{module.__name__}.{name}": sum(len(cache) for cache, *_ in fn.device_caches.values())
            for module, name, fn in jit_functions() if isinstance(fn, JITFunction)}


def compile_count() -> int:
    """Compiled variants so far of all TokModel Triton kernels together."""
    return sum(compiled_variants().values())
