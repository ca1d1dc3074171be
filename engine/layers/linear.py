"""Linear layers whose output stacks several checkpoint matrices, so that one matmul computes them all.

Each knows where its parts go: `load_shard` copies a checkpoint tensor (weight or bias) into its rows by the
part's name, never by its shape (q, k and v can share a size, and so can gate and up). Names as vLLM's
(QKVParallelLinear, MergedColumnParallelLinear), without tensor parallelism.
"""
from __future__ import annotations

import torch
from torch import nn


class StackedLinear(nn.Linear):
    """nn.Linear over the concatenated outputs of named parts."""

    def __init__(self, input_size: int, part_sizes: dict[str | int, int], bias: bool) -> None:
        super().__init__(input_size, sum(part_sizes.values()), bias=bias)
        self.part_sizes = part_sizes

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int) -> None:
        """Copy a checkpoint part into its rows of `param` (this layer's weight or bias)."""
        start = 0
        for part, size in self.part_sizes.items():
            if part == shard_id:
                rows = param.data[start:start + size]
                assert rows.shape == loaded.shape, f"part {shard_id!r}: {tuple(loaded.shape)} for {tuple(rows.shape)}"
                rows.copy_(loaded)
                return
            start += size
        raise KeyError(f"no part {shard_id!r} in {list(self.part_sizes)}")


class QKVLinear(StackedLinear):
    """The query, key and value projections: q then k then v."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return super().forward(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class MergedLinear(StackedLinear):
    """Several projections of the same input, parts numbered in order (gate_up_proj: 0 gate, 1 up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(input_size, dict(enumerate(output_sizes)), bias)
