"""Reading a rank's part of a checkpoint tensor. A weight arrives as a torch tensor or as a safetensors slice
(`iter_weight_slices`), which reads from disk only the rows or columns asked for: a rank of a sharded model
reads its own slices, never the whole tensor."""
from __future__ import annotations

from typing import Any

import torch

Loaded = Any  # a torch.Tensor or a safetensors slice: both index with slices


def loaded_shape(loaded: Loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def read_slice(loaded: Loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """loaded[start:start + size] along `dim`, read from disk only that far for a safetensors slice."""
    index = (slice(None),) * dim + (slice(start, start + size),)
    return loaded[index]


def copy_weight(param: torch.Tensor, loaded: Loaded, name: str) -> None:
    """The whole tensor into `param`, which must have its shape."""
    if loaded_shape(loaded) != tuple(param.shape):
        raise ValueError(f"checkpoint weight {name!r} has shape {loaded_shape(loaded)}, the model "
                         f"{tuple(param.shape)}")
    param.data.copy_(loaded[:])
