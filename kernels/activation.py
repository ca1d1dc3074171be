"""Gated activations: out = act(gate) * up for x = [gate | up], the MLP's activation, one pass over x.
act is SiLU (Llama, Qwen, Mistral, Phi) or GELU with the tanh approximation (Gemma's GeGLU)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def tanh(x):
    """tanh from exp2 (the interpreter and every GPU have it): 1 - 2 / (e^2x + 1), exact at both infinities."""
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # 2x * log2(e)


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:
        # sqrt(2 / pi) written in place: a GPU compile refuses a plain Python global inside a kernel.
        act = 0.5 * gate * (1.0 + tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
    else:
        act = gate * tl.sigmoid(gate)
    # Round act(gate) to the input dtype before the product, as the reference's two torch ops do.
    act = act.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] holding gate then up: silu(gate) * up."""
    return _act_and_mul(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] holding gate then up: gelu(gate, approximate="tanh") * up."""
    return _act_and_mul(x, gelu_tanh=True)


def _act_and_mul(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], d, dtype=x.dtype, device=x.device)
    grid = (rows.shape[0], triton.cdiv(d, _BLOCK))
    _act_and_mul_kernel[grid](rows, out, d, rows.stride(0), out.stride(0), GELU_TANH=gelu_tanh, BLOCK=_BLOCK)
    return out.view(*x.shape[:-1], d)
