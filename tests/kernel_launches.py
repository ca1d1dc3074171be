"""Kernel launches recorded by the variant Triton would compile for each on an H100: how a CPU run shows that it
compiles nothing after warm-up. A test module imports the `launches` fixture (launches recorded, not run);
benchmarks/gpu_check.py's dry run uses `recorded_launches(then_run=True)` around an engine in the interpreter, and
tests/gpu_compile.py `recorded_launch_args` to cross-compile each variant from its arguments."""
from __future__ import annotations

from collections.abc import Iterator, Set
from contextlib import contextmanager
from typing import NamedTuple

import pytest
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import KernelInterface
from triton.runtime.jit import JITFunction, create_function_from_signature

from kernels import compile_count

H100 = GPUTarget("cuda", 90, 32)  # compute capability 9.0, warp size 32


class VariantKey:
    """The key Triton's JIT on an H100 gives the variant it compiles for a launch of `function` (argument types;
    ints equal to 1 or divisible by 16 and 16-byte aligned pointers, unless do_not_specialize; constexprs; launch
    options). Built on Triton 3.x internals (the JIT's binder)."""

    def __init__(self, function: KernelInterface) -> None:
        self.jit = as_jit_function(function)
        self.name = function.fn.__name__
        self.bind = create_function_from_signature(self.jit.signature, self.jit.params, make_backend(H100))

    def __call__(self, *args, **kwargs) -> tuple:
        _, specialization, options = self.bind(*args, **kwargs)
        return self.name, tuple(specialization), str(options)


def as_jit_function(function: KernelInterface) -> JITFunction:
    """The JITFunction a GPU run would have of `function` (under the interpreter `function` is not one)."""
    return function if isinstance(function, JITFunction) else JITFunction(function.fn, **function.kwargs)


class Launch(NamedTuple):
    """One kernel launch's arguments (kernel[grid](*args, **kwargs)), with the kernel as a JITFunction."""
    kernel: JITFunction
    args: tuple
    kwargs: dict


@contextmanager
def recorded_launches(then_run: bool) -> Iterator[Set[tuple]]:
    """Every kernel launch inside the block, recorded by its H100 variant; run as well if `then_run`."""
    with recorded_launch_args(then_run) as launches:
        yield launches.keys()


@contextmanager
def recorded_launch_args(then_run: bool) -> Iterator[dict[tuple, Launch]]:
    """The first launch of each H100 variant inside the block, by variant; run as well if `then_run`. Each
    kernel's own `run` is wrapped: `kernel[grid](...)` calls it, while a @triton.jit helper called from inside a
    kernel is untouched."""
    recorded: dict[tuple, Launch] = {}
    functions = [function for _, _, function in compile_count.jit_functions()]
    for function in functions:
        function.run = _recording_run(function, recorded, then_run)
    try:
        yield recorded
    finally:
        for function in functions:
            del function.run  # the class's run again


def _recording_run(function: KernelInterface, recorded: dict[tuple, Launch], then_run: bool):
    key, original = VariantKey(function), function.run

    def run(*args, grid, warmup, **kwargs):
        recorded.setdefault(key(*args, **kwargs), Launch(key.jit, args, kwargs))
        if then_run:
            return original(*args, grid=grid, warmup=warmup, **kwargs)

    return run


@pytest.fixture
def launches() -> Iterator[set[tuple]]:
    """Every kernel launch recorded, not run, by its H100 variant."""
    with recorded_launches(then_run=False) as recorded:
        yield recorded
