"""Fused RMSNorm with an optional residual add: one read of x (and residual), one write of each output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, hidden, eps,
                     stride_x, stride_res, stride_out, stride_res_out,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to its dtype before it is normalised, as the reference's x + residual is.
        x = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    # The reference rounds the normalised x to x's dtype, then multiplies by the weight in the promoted dtype.
    normed = (x * rstd).to(res_out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in fp32. With a residual: returns (norm(x + residual), x + residual)."""
    hidden = x.shape[-1]
    rows = _rows(x)
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(rows.shape, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    # Without a residual the (unused) residual output only carries x's dtype into the kernel.
    res_rows = rows if residual is None else _rows(residual)
    res_out = torch.empty(rows.shape, dtype=sum_dtype, device=x.device) if residual is not None else rows
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res_rows, weight, out, res_out, hidden, eps,
        rows.stride(0), res_rows.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 16))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[rows, hidden] view (a copy only if the last dim is strided)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
