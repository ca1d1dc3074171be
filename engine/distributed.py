"""The tensor-parallel group of a process: its rank, its size and the two collectives a sharded model needs.

A model is built inside `tensor_parallel(group)`; each parallel layer keeps the group it was built in, so no
forward pass reads a global. Outside that scope the group is the single rank: layers shard nothing and
reduce nothing, so a TP=1 engine never touches torch.distributed. Names as vLLM's parallel_state.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits in a collective for a peer that never comes (a dead worker fails sooner: its
# connection closes); also the bound on start-up, when every rank must join.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
IDLE_TIMEOUT = timedelta(days=365)  # a worker waiting for the next step: an idle server must not time it out


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Every rank's `x` concatenated along `dim` on rank 0 (the rank that samples); None on the others."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def all_min(self, value: int) -> int:
        """The smallest of the ranks' `value`s, on every rank (the KV-cache blocks all ranks can hold)."""
        if self.size == 1:
            return value
        x = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
        return int(x.item())


_SINGLE = TPGroup()
_building: TPGroup = _SINGLE


@contextlib.contextmanager
def tensor_parallel(group: TPGroup) -> Iterator[None]:
    """Layers built inside shard themselves for `group`."""
    global _building
    previous, _building = _building, group
    try:
        yield
    finally:
        _building = previous


def get_tp_group() -> TPGroup:
    """The group of the model being built (the single rank outside `tensor_parallel`)."""
    return _building


def init_distributed(rank: int, world_size: int, init_method: str, device: torch.device) -> TPGroup:
    """Join the process group: NCCL between GPUs, gloo on the CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    return TPGroup(rank, world_size)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
