"""Rotary position embeddings: the cos/sin table of each rope variant (config.json's rope_type).

default, linear, dynamic (NTK), llama3, yarn and longrope (Phi-3's "su"), with transformers' frequencies. The
table holds cos then sin for every position up to max_position_embeddings, already multiplied by the variant's
attention factor (yarn, longrope), so the rotary kernel is the same for all of them.

Two variants depend on the sequence length in transformers, which a table shared by a batch cannot: dynamic NTK
rescales its base only past max_position_embeddings, which the engine never serves (max_model_len is bounded by
it), so inside it the table is transformers' exactly; longrope switches the whole sequence to its long factors
once it is longer than original_max_position_embeddings, where the table switches per position (as vLLM),
so the two agree on every sequence within the original context.
"""
from __future__ import annotations

import math

import torch


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The rope settings of config.json (transformers 5's standardized `rope_parameters`), for one layer type
    where they differ by type (Gemma 3: local and global layers)."""
    params = dict(config.rope_parameters)
    if layer_type is not None and layer_type in params:
        params = dict(params[layer_type])
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return params


def inv_frequencies(params: dict, rotary_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2], attention factor) of one variant; fp32 throughout, as transformers
    computes them, so positions rotate bit-identically to the reference."""
    base = params["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    kind = params["rope_type"]
    if kind in ("default", "dynamic"):  # dynamic NTK leaves the base alone inside the served context
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params), 1.0
    if kind == "yarn":
        return _yarn(params, rotary_dim, max_position)
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, dynamic, llama3, yarn, "
                     f"longrope)")


def _llama3(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    return torch.where((wavelen <= old_len / low) & (wavelen >= old_len / high), blended, out)


def _yarn(params: dict, rotary_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp between the dimensions where
    the original context makes beta_fast and beta_slow rotations; scale attention by mscale."""
    base, original = params["rope_theta"], params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))

    def dim_of(rotations: float) -> float:  # the dimension that makes `rotations` turns over the original context
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _longrope(params: dict, rotary_dim: int, max_position: int) -> torch.Tensor:
    """Phi-3's LongRoPE table: per-frequency factors, the short ones inside the original context, the long ones
    past it."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    tables = []
    for factors, positions in ((params["short_factor"], range(min(original, max_position))),
                               (params["long_factor"], range(original, max_position))):
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * params["rope_theta"] ** exponents)
        tables.append(_table(inv_freq, torch.tensor(positions, dtype=torch.float32), attention_factor))
    return torch.cat(tables)


def _table(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float) -> torch.Tensor:
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs.cos() * attention_factor, freqs.sin() * attention_factor), dim=-1)


def cos_sin_cache(params: dict, head_dim: int, max_position: int) -> torch.Tensor:
    """[max_position, rotary_dim] in fp32: cos of each frequency in the first half, sin in the second."""
    rotary_dim = int(head_dim * params["partial_rotary_factor"])
    if params["rope_type"] == "longrope":
        return _longrope(params, rotary_dim, max_position)
    inv_freq, attention_factor = inv_frequencies(params, rotary_dim, max_position)
    return _table(inv_freq, torch.arange(max_position, dtype=torch.float32), attention_factor)


def rope_layer_types(config) -> list[str | None]:
    """The layer types that have a rope of their own (Gemma 3: full_attention, sliding_attention), or [None]
    where all layers share one."""
    params = config.rope_parameters
    return sorted(kind for kind in set(getattr(config, "layer_types", None) or []) if kind in params) or [None]
