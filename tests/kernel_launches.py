"""Kernel launches recorded, not run, by the variant Triton would compile for each on an H100: how a CPU test
shows that a run compiles nothing after warm-up. A test module imports the `launches` fixture."""
from __future__ import annotations

import pytest
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import KernelInterface
from triton.runtime.jit import JITFunction, create_function_from_signature

from kernels import compile_count

H100 = GPUTarget("cuda", 90, 32)  # compute capability 9.0, warp size 32


class LaunchRecorder(JITFunction):
    """A @triton.jit function that runs nothing: it records each launch by the key Triton's JIT on an H100 gives
    the variant it compiles (argument types; ints equal to 1 or divisible by 16 and 16-byte aligned pointers,
    unless do_not_specialize; constexprs; launch options). Built on Triton 3.x internals (the JIT's binder)."""

    def __init__(self, function: KernelInterface, launches: set[tuple]) -> None:
        super().__init__(function.fn, **function.kwargs)
        self.launches = launches
        self.bind = create_function_from_signature(self.signature, self.params, make_backend(H100))

    def run(self, *args, grid, warmup, **kwargs) -> None:
        _, specialization, options = self.bind(*args, **kwargs)
        self.launches.add((self.fn.__name__, tuple(specialization), str(options)))


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> set[tuple]:
    """Every kernel launch recorded, not run, by its H100 variant (see LaunchRecorder)."""
    recorded: set[tuple] = set()
    recorders = {function: LaunchRecorder(function, recorded) for _, _, function in compile_count.jit_functions()}
    for module in compile_count.KERNEL_MODULES:  # under every name, imported ones too
        for name, value in list(vars(module).items()):
            if isinstance(value, KernelInterface):
                monkeypatch.setattr(module, name, recorders[value])
    return recorded
