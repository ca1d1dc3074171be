"""The gated activations of the MLPs, by the name config.json gives them (hidden_act / hidden_activation)."""
from __future__ import annotations

from typing import Callable

import torch

from kernels import KernelOps


def get_act_and_mul(ops: KernelOps, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """act(gate) * up over x = [gate | up]: SiLU (SwiGLU) or GELU's tanh approximation (GeGLU)."""
    if name in ("silu", "swish"):
        return ops.silu_and_mul
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return ops.gelu_tanh_and_mul
    raise ValueError(f"hidden activation {name!r} is not supported (supported: silu, gelu_pytorch_tanh)")
