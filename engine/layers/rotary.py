"""The cos/sin cache of rotary embeddings, with the rope scalings of the Llama family."""
from __future__ import annotations

import math

import torch


def inv_frequencies(rotary_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    # fp32 throughout, as transformers computes it, so positions rotate bit-identically to the reference
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind in ("default", None):
        return inv_freq
    raise ValueError(f"rope_scaling type {kind!r} is not supported")


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    return torch.where((wavelen <= old_len / low) & (wavelen >= old_len / high), blended, out)


def cos_sin_cache(rotary_dim: int, max_position: int, base: float, scaling: dict | None) -> torch.Tensor:
    """[max_position, rotary_dim] in fp32: cos of each frequency in the first half, sin in the second."""
    inv_freq = inv_frequencies(rotary_dim, base, scaling)
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
