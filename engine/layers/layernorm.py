"""RMSNorm, optionally fused with the residual add, through the engine's kernel ops."""
from __future__ import annotations

import torch
from torch import nn

from kernels import KernelOps


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Called with a residual: returns (norm(x + residual), x + residual)."""

    weight_offset = 0.0

    def __init__(self, ops: KernelOps, size: int, eps: float) -> None:
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual, self.weight_offset)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), the checkpoint holding weight (zero-centred)."""

    weight_offset = 1.0
