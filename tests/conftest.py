"""Shared pytest setup for the whole suite."""
from __future__ import annotations

import os

import torch

# Triton kernels: without CUDA they run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET when a kernel
# is decorated (at import), so this must run before any test module imports kernels/.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
