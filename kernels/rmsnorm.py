"""Fused RMSNorm with an optional residual add: one read of x (and residual), one write of each output.

x may be a [tokens, heads, head_dim] view with strided tokens (q or k cut from the fused qkv projection): rows
are addressed by (token, head), so Qwen3's and Gemma 3's per-head norms read the projection without a copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, hidden, heads, eps,
                     stride_x_tok, stride_x_head, stride_res, stride_out, stride_res_out,
                     HAS_RESIDUAL: tl.constexpr, WEIGHT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + (row // heads) * stride_x_tok + (row % heads) * stride_x_head + cols,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to its dtype before it is normalised, as the reference's x + residual is.
        x = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if WEIGHT_OFFSET != 0.0:
        # Gemma: x * (offset + w), all in fp32, rounded once.
        out = x * rstd * (w + WEIGHT_OFFSET)
    else:
        # The reference rounds the normalised x to x's dtype, then multiplies by the weight in the promoted dtype.
        out = (x * rstd).to(res_out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             weight_offset: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """kernels.reference.rms_norm (the specification)."""
    hidden = x.shape[-1]
    tokens = _token_rows(x)
    num_rows = tokens.shape[0] * tokens.shape[1]
    out_dtype, sum_dtype = output_dtypes(x, weight, residual, weight_offset)
    out = torch.empty(num_rows, hidden, dtype=out_dtype, device=x.device)
    # Without a residual the (unused) residual tensors only carry x's dtype into the kernel.
    res_rows = tokens if residual is None else _rows(residual)
    res_out = tokens if residual is None else torch.empty(num_rows, hidden, dtype=sum_dtype, device=x.device)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        tokens, res_rows, weight, out, res_out, hidden, tokens.shape[1], eps,
        tokens.stride(0), tokens.stride(1), res_rows.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, WEIGHT_OFFSET=float(weight_offset), BLOCK=block,
        num_warps=min(max(block // 256, 1), 16))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def output_dtypes(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                  weight_offset: float) -> tuple[torch.dtype, torch.dtype]:
    """(the norm's dtype, x + residual's), as the reference's torch ops promote them."""
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return (sum_dtype if weight_offset else torch.promote_types(sum_dtype, weight.dtype)), sum_dtype


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, hidden] view (heads = 1 for a 2-D input; a copy only if the last dim is strided)."""
    if t.dim() == 3 and t.stride(-1) == 1:
        return t
    return _rows(t)[:, None]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[rows, hidden] view (a copy only if the last dim is strided)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
