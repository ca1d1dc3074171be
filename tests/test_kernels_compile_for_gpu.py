"""Every Triton kernel variant the engine launches compiles for real GPUs (H100 sm_90, A100 sm_80), on a CPU.

The interpreter the other kernel tests run in accepts code a GPU compile refuses (a Python global read inside a
kernel raised NameError on the first GPU run); tests/gpu_compile.py cross-compiles each variant to a cubin in a
process without the interpreter. ~30 s on two idle cores, seconds once Triton's cache holds the kernels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import compile_count

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """One result per (variant, target): kernel, arch, signature, constexprs, error (None) and shared bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.gpu_compile"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def _launched_kernels() -> set[str]:
    """Every @triton.jit function of the kernel modules that no other one calls: those the launchers launch."""
    functions = {name: function.fn for _, name, function in compile_count.jit_functions()}
    sources = {name: function.__code__ for name, function in functions.items()}
    called = {name for name in functions for other, code in sources.items()
              if other != name and name in code.co_names}
    return set(functions) - called


def test_every_launched_kernel_is_compiled_for_both_gpus(compiled: list[dict]) -> None:
    kernels = _launched_kernels()
    assert {r["kernel"] for r in compiled if r["arch"] == 90} == kernels
    assert {r["kernel"] for r in compiled if r["arch"] == 80} == kernels


def test_every_kernel_variant_compiles_to_a_cubin(compiled: list[dict]) -> None:
    failures = [f"{r['kernel']} sm_{r['arch']} {r['signature']} {r['constexprs']}:\n  {r['error']}"
                for r in compiled if r["error"]]
    assert not failures, "\n".join(failures)


def test_every_kernel_variant_fits_the_gpus_shared_memory(compiled: list[dict]) -> None:
    over = [f"{r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['shared']} > {r['max_shared']} bytes"
            for r in compiled if not r["error"] and r["shared"] > r["max_shared"]]
    assert not over, "\n".join(over)
