"""The CPU's kernels (kernel_backend="cpu"): the PyTorch reference ops, with the ones a compiled C kernel does
faster on a CPU taken from kernels/cpu/: decode attention read from the paged cache in place (instead of gathered
and padded), RMSNorm(+residual), and the rotary embedding with the KV write, in one pass each (instead of 5-20
tensor ops), and the bf16 matmuls, on weights packed for AVX-512 BF16 once they are loaded. Each falls back to the
reference for what the C kernels do not take (fp16, a last dim that is not contiguous), and the whole backend is
the reference where no C compiler built them."""
from __future__ import annotations

import ctypes

import torch

from kernels import reference
from kernels.cpu.build import load
# SiLU/GELU-and-mul stay torch's: its two vectorized passes were faster than one C pass behind a ctypes call.
from kernels.reference import fused_moe, gelu_tanh_and_mul, prefill_attention, silu_and_mul, tune_linear

__all__ = ["rotary_embedding_and_write_kv", "paged_decode_attention", "prefill_attention", "rms_norm",
           "silu_and_mul", "gelu_tanh_and_mul", "fused_moe", "linear", "tune_linear", "pack_linear_weight",
           "embedding", "available"]

# kernels/cpu/linear.c's packed layout: blocks of PACK_BLOCK output columns, each [K / 2][PACK_BLOCK][2].
PACK_BLOCK = 32

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_I64, _INT, _PTR, _FLOAT = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "paged_decode_attention": (_INT, [_PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _INT, _INT, _PTR, _I64, _I64,
                                      _INT, _INT, _INT, _INT, _FLOAT, _INT, _FLOAT, _INT, _INT]),
    "rms_norm": (None, [_PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _INT, _FLOAT, _INT, _FLOAT, _INT, _INT]),
    "rotary_embedding_and_write_kv": (_INT, [_PTR, _PTR, _I64, _I64, _INT, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR,
                                             _INT, _INT, _PTR, _I64, _INT, _I64, _INT, _INT, _INT]),
    "linear_bf16": (None, [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _INT, _INT, _INT, _INT]),
    "linear_bf16_available": (_INT, []),
}


def _function(library_name: str, name: str):
    library = load(library_name)
    if library is None:
        return None
    function = getattr(library, name)
    function.restype, function.argtypes = _SIGNATURES[name]
    return function


_ATTENTION = _function("paged_decode_attention", "paged_decode_attention")
_RMS_NORM = _function("elementwise", "rms_norm")
_ROTARY_WRITE_KV = _function("elementwise", "rotary_embedding_and_write_kv")
_LINEAR_BUILT = _function("linear", "linear_bf16_available")
# Only for CPUs with AVX-512 BF16 (kernels/cpu/linear.c); elsewhere the matmuls stay torch's.
_LINEAR = _function("linear", "linear_bf16") if _LINEAR_BUILT is not None and _LINEAR_BUILT() else None


def available() -> bool:
    """Whether the compiled kernels loaded (a C compiler was found): without them this backend is the reference."""
    return _ATTENTION is not None and _RMS_NORM is not None


def linear_available() -> bool:
    """Whether linear streams bf16 weights in C (a CPU with AVX-512 BF16), rather than calling torch's matmul."""
    return _LINEAR is not None


def _code(*tensors: torch.Tensor) -> int | None:
    """The C kernels' dtype code when every tensor has one dtype they take and a contiguous last dim, else None."""
    dtype = tensors[0].dtype
    code = _DTYPE_CODES.get(dtype)
    # A plain loop on cheap attributes: this runs before every call, hundreds of times a decode step.
    for tensor in tensors:
        if tensor.dtype != dtype or tensor.stride(-1) != 1 or not tensor.is_cpu:
            return None
    return code


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, first_seq: int, end_seq: int, scale: float, max_seq_len: int,
                           sliding_window: int | None = None, logits_soft_cap: float | None = None, *,
                           out: torch.Tensor) -> None:
    """kernels/reference.py's paged_decode_attention, reading each sequence's blocks where they lie."""
    code = _code(query, kv_cache, out)
    if (_ATTENTION is None or code is None or not kv_cache.is_contiguous() or block_tables.dtype != torch.int32
            or seq_lens.dtype != torch.int32 or query.dim() != 3 or out.shape != query.shape
            or query.shape[2] != kv_cache.shape[-1]):
        return reference.paged_decode_attention(query, kv_cache, block_tables, seq_lens, first_seq, end_seq, scale,
                                                max_seq_len, sliding_window, logits_soft_cap, out=out)
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    status = _ATTENTION(query.data_ptr(), query.stride(0), query.stride(1), kv_cache.data_ptr(), num_blocks,
                        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), first_seq, end_seq,
                        out.data_ptr(), out.stride(0), out.stride(1), query.shape[1], num_kv_heads, head_dim,
                        block_size, scale, sliding_window or 0, logits_soft_cap or 0.0, code, torch.get_num_threads())
    if status != 0:  # a head or a query group larger than the kernel's buffers
        reference.paged_decode_attention(query, kv_cache, block_tables, seq_lens, first_seq, end_seq, scale,
                                         max_seq_len, sliding_window, logits_soft_cap, out=out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             weight_offset: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """kernels/reference.py's rms_norm in one pass."""
    code = _code(x, weight) if residual is None else _code(x, weight, residual)
    hidden = x.shape[-1]
    # weight: a 1-D row, contiguous as _code checked its one stride
    if (_RMS_NORM is None or code is None or weight.dim() != 1 or weight.shape[0] != hidden
            or (residual is not None and residual.shape != x.shape)):
        return reference.rms_norm(x, weight, eps, residual, weight_offset)
    # Tokens as rows; a model's x is 2-D already (a reshape costs a microsecond, and this runs twice a layer).
    rows = x if x.dim() == 2 else x.reshape(-1, hidden)
    out = torch.empty(x.shape, dtype=x.dtype)
    summed = residual_rows = None
    if residual is not None:
        summed = torch.empty(x.shape, dtype=x.dtype)
        residual_rows = residual if residual.dim() == 2 else residual.reshape(-1, hidden)
    _RMS_NORM(rows.data_ptr(), rows.stride(0), 0 if residual is None else residual_rows.data_ptr(),
              0 if residual is None else residual_rows.stride(0), out.data_ptr(), hidden,
              0 if summed is None else summed.data_ptr(), weight.data_ptr(), rows.shape[0], hidden, eps,
              int(bool(weight_offset)), weight_offset, code, torch.get_num_threads())
    return out if summed is None else (out, summed)


def rotary_embedding_and_write_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                                  slot_mapping: torch.Tensor, is_neox: bool = True,
                                  q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                                  norm_eps: float = 1e-6, norm_weight_offset: float = 0.0) -> None:
    """kernels/reference.py's rotary_embedding_and_write_kv in one pass over the tokens (after rms_norm's over the
    heads, with norm weights); the reference where the layouts or dtypes differ."""
    if q_norm_weight is not None:
        query.copy_(rms_norm(query, q_norm_weight, norm_eps, None, norm_weight_offset))
        key = rms_norm(key, k_norm_weight, norm_eps, None, norm_weight_offset)
    code = _code(query, key, value, kv_cache)
    if _ROTARY_WRITE_KV is None or code is None or not _c_takes_rotary_write_kv(positions, query, key, value,
                                                                               cos_sin_cache, kv_cache, slot_mapping):
        return reference.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin_cache, kv_cache,
                                                       slot_mapping, is_neox)
    num_tokens, num_heads, head_dim = query.shape
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]  # blocks x block size
    status = _ROTARY_WRITE_KV(positions.data_ptr(), query.data_ptr(), query.stride(0), query.stride(1), num_heads,
                              key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), kv_cache.data_ptr(),
                              num_slots, slot_mapping.data_ptr(), key.shape[1], head_dim, cos_sin_cache.data_ptr(),
                              cos_sin_cache.shape[0], cos_sin_cache.shape[1], num_tokens, int(is_neox), code,
                              torch.get_num_threads())
    if status == -1:
        raise IndexError(f"slot_mapping holds a slot outside the cache's {num_slots}")
    if status == -2:
        raise IndexError(f"positions holds a position outside the rotary table's {cos_sin_cache.shape[0]}")


def _c_takes_rotary_write_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Whether kernels/cpu's rotary_embedding_and_write_kv reads these layouts: key and value rows whose heads are
    contiguous, as the cache's, a whole float32 table, int64 positions and slots."""
    if query.dim() != 3 or not kv_cache.is_contiguous():
        return False
    num_tokens, _, head_dim = query.shape
    kv_shape = (num_tokens, kv_cache.shape[-2], head_dim)
    return (key.shape == kv_shape and value.shape == kv_shape and kv_cache.shape[-1] == head_dim
            and key.stride(1) == head_dim and value.stride(1) == head_dim
            and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
            and cos_sin_cache.shape[1] <= head_dim and positions.dtype == torch.int64 and positions.is_contiguous()
            and positions.shape == (num_tokens,) and slot_mapping.dtype == torch.int64
            and slot_mapping.is_contiguous() and slot_mapping.shape == (num_tokens,))


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A loaded linear weight [N, K] in the layout `linear` reads: on a CPU with AVX-512 BF16, a bf16 weight
    whose N is a multiple of PACK_BLOCK and K even becomes [N / PACK_BLOCK, K / 2, PACK_BLOCK, 2]
    (kernels/cpu/linear.c says why); any other weight (an already packed one too) is returned as it is, and
    its layer's matmuls stay torch's."""
    if _LINEAR is None or weight.dim() != 2 or weight.dtype != torch.bfloat16 or not weight.is_cpu:
        return weight
    rows, width = weight.shape
    if rows % PACK_BLOCK or width % 2:
        return weight
    return weight.reshape(rows // PACK_BLOCK, PACK_BLOCK, width // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """pack_linear_weight's input back from its output: [N, K]."""
    if weight.dim() == 2:
        return weight
    blocks, pairs = weight.shape[:2]
    return weight.permute(0, 2, 1, 3).reshape(blocks * PACK_BLOCK, pairs * 2)


def embedding(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """kernels/reference.py's embedding; from a packed weight (a tied LM head's, which its embedding shares rather
    than keeping a second copy) each token's row is gathered from its block's column."""
    if weight.dim() == 2:
        return reference.embedding(input_ids, weight)
    ids = input_ids.reshape(-1)
    rows = weight[ids // PACK_BLOCK, :, ids % PACK_BLOCK]  # [tokens, K / 2, 2]
    return rows.reshape(*input_ids.shape, weight.shape[1] * 2)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """kernels/reference.py's linear, for a weight as pack_linear_weight left it: a packed one in C."""
    if weight.dim() == 2:
        return reference.linear(x, weight, bias)
    outputs, width = weight.shape[0] * PACK_BLOCK, weight.shape[1] * 2
    # The weight is pack_linear_weight's (contiguous bf16 on the CPU): only x and the bias are checked, with
    # cheap attributes, as this runs four times a layer.
    if (x.dtype != torch.bfloat16 or not x.is_cpu or x.stride(-1) != 1 or x.shape[-1] != width
            or (bias is not None and (bias.dtype != x.dtype or bias.shape != (outputs,) or not bias.is_contiguous()))):
        return reference.linear(x, unpack_linear_weight(weight), bias)  # correct, not fast: no layer does this
    rows = x if x.dim() == 2 else x.reshape(-1, width)
    out = torch.empty(rows.shape[0], outputs, dtype=torch.bfloat16)
    _LINEAR(rows.data_ptr(), rows.stride(0), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            out.data_ptr(), outputs, rows.shape[0], outputs, width, torch.get_num_threads())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], outputs)
