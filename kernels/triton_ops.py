"""The Triton backend of KernelOps (kernel_backend="triton"): one kernel per file, each launcher registered here as a
torch.library op, torch.ops.tokmodel.<name>, which the engine calls eagerly and torch.compile / torch.export trace
as one opaque node (what Triton's Python launch code could not be).

Each op's schema is inferred from its launcher's signature and declares the arguments it writes (the KV cache, `out`,
the rotated query); a fake implementation gives its outputs' shapes and dtypes without running it. The ops
are defined with torch.library.Library rather than torch.library.custom_op, which wraps every call in Python
autograd and version-counter kernels: on a CPU these added 4 to 65 us a call to the launcher's host time (most to
the ops that write their arguments), the dispatcher alone 2 to 8 (benchmarks/op_dispatch.py), so the eager path
calls the ops too. The engine runs in inference mode and never differentiates through a kernel.

A custom op takes no keyword-only tensor and returns one fixed type, so the attention ops take `out` first
(KernelOps' functions keep it as a keyword) and KernelOps' rms_norm picks tokmodel::rms_norm or, with a residual,
tokmodel::fused_add_rms_norm.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.library import Library, infer_schema, register_fake

from kernels import activation, decode_attention, gemv, reference, rmsnorm, rope
from kernels import fused_moe as moe
from kernels import prefill_attention as prefill

_LIBRARY = Library("tokmodel", "DEF")


def _define(name: str, launcher: Callable, fake: Callable, mutates_args: tuple[str, ...] = ()) -> Callable:
    """torch.ops.tokmodel.<name>, run by launcher on every device and traced through fake."""
    _LIBRARY.define(name + infer_schema(launcher, mutates_args=mutates_args))
    _LIBRARY.impl(name, launcher, "CompositeExplicitAutograd")
    register_fake(f"tokmodel::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.tokmodel, name).default


def _writes_only(*args, **kwargs) -> None:
    """The fake of an op whose outputs are its mutated arguments."""


def _paged_decode_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, first_seq: int, end_seq: int, scale: float, max_seq_len: int,
                            sliding_window: int | None, logits_soft_cap: float | None) -> None:
    decode_attention.paged_decode_attention(query, kv_cache, block_tables, seq_lens, first_seq, end_seq, scale,
                                            max_seq_len, sliding_window, logits_soft_cap, out=out)


def _prefill_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, query_start_loc: torch.Tensor, first_seq: int, end_seq: int,
                       scale: float, max_seq_len: int, sliding_window: int | None,
                       logits_soft_cap: float | None) -> None:
    prefill.prefill_attention(query, kv_cache, block_tables, seq_lens, query_start_loc, first_seq, end_seq, scale,
                              max_seq_len, sliding_window, logits_soft_cap, out=out)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    return rmsnorm.rms_norm(x, weight, eps, None, weight_offset)


def _fake_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=rmsnorm.output_dtypes(x, weight, None, weight_offset)[0])


def _fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        weight_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rmsnorm.rms_norm(x, weight, eps, residual, weight_offset)


def _fake_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             weight_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype, sum_dtype = rmsnorm.output_dtypes(x, weight, residual, weight_offset)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=sum_dtype)


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int,
          num_warps: int, num_stages: int, use_dot: bool) -> torch.Tensor:
    return gemv.gemv(x, weight, bias, gemv.GemvConfig(block_n, block_k, num_warps, num_stages, use_dot))


def _fake_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int,
               num_warps: int, num_stages: int, use_dot: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _fake_act_and_mul(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def _fake_fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    return hidden_states.new_empty(hidden_states.shape[0], w2.shape[1])


rotary_embedding_and_write_kv = _define("rotary_embedding_and_write_kv", rope.rotary_embedding_and_write_kv,
                                        _writes_only, ("query", "kv_cache"))
silu_and_mul = _define("silu_and_mul", activation.silu_and_mul, _fake_act_and_mul)
gelu_tanh_and_mul = _define("gelu_tanh_and_mul", activation.gelu_tanh_and_mul, _fake_act_and_mul)
fused_moe = _define("fused_moe", moe.fused_moe, _fake_fused_moe)
_decode_op = _define("paged_decode_attention", _paged_decode_attention, _writes_only, ("out",))
_prefill_op = _define("prefill_attention", _prefill_attention, _writes_only, ("out",))
_rms_norm_op = _define("rms_norm", _rms_norm, _fake_rms_norm)
_gemv_op = _define("gemv", _gemv, _fake_gemv)
_fused_add_rms_norm_op = _define("fused_add_rms_norm", _fused_add_rms_norm, _fake_fused_add_rms_norm)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, first_seq: int, end_seq: int, scale: float, max_seq_len: int,
                           sliding_window: int | None = None, logits_soft_cap: float | None = None, *,
                           out: torch.Tensor) -> None:
    """kernels.reference.paged_decode_attention (the specification)."""
    _decode_op(out, query, kv_cache, block_tables, seq_lens, first_seq, end_seq, scale, max_seq_len, sliding_window,
               logits_soft_cap)


def prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, first_seq: int, end_seq: int,
                      scale: float, max_seq_len: int, sliding_window: int | None = None,
                      logits_soft_cap: float | None = None, *, out: torch.Tensor) -> None:
    """kernels.reference.prefill_attention (the specification)."""
    _prefill_op(out, query, kv_cache, block_tables, seq_lens, query_start_loc, first_seq, end_seq, scale, max_seq_len,
                sliding_window, logits_soft_cap)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             weight_offset: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """kernels.reference.rms_norm (the specification)."""
    if residual is None:
        return _rms_norm_op(x, weight, eps, weight_offset)
    return _fused_add_rms_norm_op(x, residual, weight, eps, weight_offset)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.reference.linear: cuBLAS's, or in a decode step's CUDA graph kernels/gemv.py's where tune_linear found
    it faster for this layer (elsewhere the lookup is a comparison or two)."""
    config = gemv.chosen_config(x, weight, bias)
    if config is None:
        return F.linear(x, weight, bias)
    return _gemv_op(x, weight, bias, *config)


tune_linear = gemv.tune
pack_linear_weight, embedding = reference.pack_linear_weight, reference.embedding

__all__ = ["rotary_embedding_and_write_kv", "paged_decode_attention", "prefill_attention", "rms_norm",
           "silu_and_mul", "gelu_tanh_and_mul", "fused_moe", "linear", "tune_linear", "pack_linear_weight",
           "embedding"]
