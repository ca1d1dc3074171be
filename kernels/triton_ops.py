"""The Triton backend of KernelOps (kernel_backend="triton"): one kernel per file, re-exported here."""
from __future__ import annotations

from kernels.activation import gelu_tanh_and_mul, silu_and_mul
from kernels.decode_attention import paged_decode_attention
from kernels.fused_moe import fused_moe
from kernels.kv_write import write_kv_cache
from kernels.prefill_attention import prefill_attention
from kernels.rmsnorm import rms_norm
from kernels.rope import rotary_embedding

__all__ = ["write_kv_cache", "paged_decode_attention", "prefill_attention", "rms_norm", "rotary_embedding",
           "silu_and_mul", "gelu_tanh_and_mul", "fused_moe"]
