"""Linear layers split over the ranks of a tensor-parallel group (one rank: plain nn.Linear), as Megatron's
and vLLM's: column-parallel layers own a slice of the output (QKV, gate-up: no communication), row-parallel
ones a slice of the input and sum the ranks' products with one all-reduce (o_proj, down_proj).

Each layer loads its own slice of a checkpoint tensor (`weight_loader`), so sharding lives here and not in the
models. Stacked layers (QKV, gate-up) compute several checkpoint matrices in one matmul and place each part by
its name, never by its shape (q, k and v can share a size, and so can gate and up). Names as vLLM's.

Each multiplies with its kernel backend's `linear` (KernelOps.linear): torch's F.linear, or on a bf16 CPU a C kernel
that reads the weight packed for it, which `process_weights_after_loading` does once the checkpoint is in. Layers
hold the KernelOps itself, as the others do, so the profiler can see it.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.distributed import get_tp_group
from engine.layers.sharded_weights import Loaded, copy_weight, loaded_shape, read_slice
from kernels import KernelOps


class KernelLayoutWeight:
    """A layer whose `weight` goes to its backend's `linear`: loaded as [N, K], then put in the layout that reads."""
    ops: KernelOps
    weight: nn.Parameter

    def process_weights_after_loading(self) -> None:
        """After the last weight_loader call (vLLM's name): packed for a bf16 CPU's C kernel, elsewhere unchanged.
        A tied LM head's embedding is then tied to the new weight again (model_runner._build_model)."""
        laid_out = self.ops.pack_linear_weight(self.weight.data)
        if laid_out.shape != self.weight.shape:
            self.weight = nn.Parameter(laid_out, requires_grad=False)


def dense_layers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of each layer of the model whose weight goes to `linear` inside a decode step's CUDA graph:
    what KernelOps.tune_linear tunes. Not the LM head, which runs after the graph on the sampled rows."""
    lm_head = getattr(model, "lm_head", None)
    return [(m.weight, getattr(m, "bias", None)) for m in model.modules()
            if isinstance(m, KernelLayoutWeight) and m is not lm_head]


class StackedLinear(KernelLayoutWeight, nn.Linear):
    """Column-parallel nn.Linear over the concatenated outputs of named parts. parts: for each part, (its size
    in the checkpoint, its rows on this rank, the first of them in the checkpoint's part)."""

    def __init__(self, ops: KernelOps, input_size: int, parts: dict[str | int, tuple[int, int, int]],
                 bias: bool) -> None:
        super().__init__(input_size, sum(size for _, size, _ in parts.values()), bias=bias)
        self.ops = ops
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: str | int | None) -> None:
        """This rank's rows of a checkpoint part (shard_id), or of every part of a checkpoint that already
        stacks them (shard_id None: Phi-3's qkv_proj and gate_up_proj)."""
        if shard_id is not None and shard_id not in self.parts:
            raise KeyError(f"no part {shard_id!r} in {list(self.parts)}")
        parts = list(self.parts) if shard_id is None else [shard_id]
        expected = (sum(self.parts[part][0] for part in parts),) + tuple(param.shape[1:])
        if loaded_shape(loaded) != expected:
            raise ValueError(f"part {shard_id!r}: checkpoint shape {loaded_shape(loaded)}, expected {expected}")
        checkpoint_row = 0
        for part in parts:
            full, size, first = self.parts[part]
            row = self._first_row(part)
            param.data[row:row + size].copy_(read_slice(loaded, 0, checkpoint_row + first, size))
            checkpoint_row += full

    def _first_row(self, part: str | int) -> int:
        names = list(self.parts)
        return sum(self.parts[name][1] for name in names[:names.index(part)])


class QKVParallelLinear(StackedLinear):
    """The query, key and value projections, q then k then v, heads split over the ranks; with fewer KV heads
    than ranks each rank holds the one KV head its query heads read (replicated, as vLLM)."""

    def __init__(self, ops: KernelOps, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool) -> None:
        tp = get_tp_group()
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        kv_head = tp.rank * num_kv_heads // tp.size  # this rank's first KV head
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        q = (num_heads * head_dim, self.q_size, tp.rank * self.q_size)
        kv = (num_kv_heads * head_dim, self.kv_size, kv_head * head_dim)
        super().__init__(ops, hidden_size, {"q": q, "k": kv, "v": kv}, bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return super().forward(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class MergedColumnParallelLinear(StackedLinear):
    """Several projections of the same input, parts numbered in order (gate_up_proj: 0 gate, 1 up), each split
    over the ranks."""

    def __init__(self, ops: KernelOps, input_size: int, output_sizes: list[int], bias: bool) -> None:
        tp = get_tp_group()
        parts = {i: (size, size // tp.size, tp.rank * (size // tp.size)) for i, size in enumerate(output_sizes)}
        super().__init__(ops, input_size, parts, bias)


class RowParallelLinear(KernelLayoutWeight, nn.Linear):
    """Each rank multiplies its slice of the input by its columns of the weight; one all-reduce sums them. The
    bias is added once, after the sum."""

    def __init__(self, ops: KernelOps, input_size: int, output_size: int, bias: bool) -> None:
        self.tp = get_tp_group()
        super().__init__(input_size // self.tp.size, output_size, bias=bias)
        self.ops = ops

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: None = None) -> None:
        if param is self.bias or self.tp.size == 1:
            copy_weight(param, loaded, "bias" if param is self.bias else "weight")
            return
        columns = param.shape[1]
        param.data.copy_(read_slice(loaded, 1, self.tp.rank * columns, columns))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.ops.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(self.ops.linear(x, self.weight, None))
        return out if self.bias is None else out + self.bias
