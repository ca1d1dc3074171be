"""The sampler's randomness: one uniform number per row and draw, never one per vocabulary entry (sampling by
inverse CDF needs a single number per token).

Unseeded rows share one batched draw from torch's generator. A seeded row reads its own counter-based stream:
the n-th output of SplitMix64 started from a mix of its key (seed + choice index, as vLLM), where n counts the
tokens the choice has sampled. So its tokens depend on its seed alone, not on what else is in the batch, and no per-request
generator has to be drawn from row by row."""
from __future__ import annotations

import torch

from engine.device_copy import to_device
from engine.request import Request

_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # the multipliers of its output function
DRAWS_PER_TOKEN = 1 << 16  # stream positions set aside per sampled token: its first draw and any redraws


def as_int64(value: int) -> int:
    """The int64 with the same low 64 bits as `value`: tensor arithmetic on int64 wraps modulo 2**64."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift of int64 (torch's >> is arithmetic, it copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64_output(state: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function (a bijective 64-bit mix) of int64 states."""
    state = (state ^ _shift_right(state, 30)) * as_int64(_MIX[0])
    state = (state ^ _shift_right(state, 27)) * as_int64(_MIX[1])
    return state ^ _shift_right(state, 31)


class RowRandom:
    """Uniforms in [0, 1) for a batch of rows, as float64."""

    def __init__(self, requests: list[Request], device: torch.device) -> None:
        keys = [as_int64(r.sampling_params.seed + r.index) if r.sampling_params.seed is not None else 0
                for r in requests]
        self.any_seeded = any(r.sampling_params.seed is not None for r in requests)
        self.seeded = to_device([r.sampling_params.seed is not None for r in requests], device, torch.bool)
        # Starting each stream at a mix of its key keeps streams of neighbouring seeds from overlapping.
        self.streams = splitmix64_output(to_device(keys, device, torch.int64))
        self.first_draws = to_device([r.num_output_tokens * DRAWS_PER_TOKEN for r in requests], device, torch.int64)

    def uniform(self, draw: int, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The `draw`-th uniform of this token (0 first) for the rows `index` takes."""
        unseeded = torch.rand(self.seeded[index].shape, dtype=torch.float64, device=self.seeded.device)
        if not self.any_seeded:
            return unseeded
        counters = self.first_draws[index] + (draw + 1)
        bits = splitmix64_output(self.streams[index] + counters * as_int64(_GOLDEN))
        seeded = _shift_right(bits, 11).to(torch.float64) * 2.0**-53  # the top 53 bits: every float64 step in [0, 1)
        return torch.where(self.seeded[index], seeded, unseeded)
