"""Host values to the model's device without a sync."""
from __future__ import annotations

import numpy as np
import torch


def to_device(values: list | np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A plain copy from pageable memory waits for the GPU; a pinned one is queued behind its work. On the CPU
    a numpy array is shared, not copied."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class HostCopy:
    """Device tensors copied to the host behind the work queued so far, without waiting for it (pinned memory
    and an event on CUDA), so that reading them later waits for that work only, not for what was queued since.
    On the CPU they are the tensors themselves."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._done: torch.cuda.Event | None = None
        self._tensors = list(tensors)
        if self._tensors and self._tensors[0].device.type == "cuda":
            self._tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                             for t in self._tensors]
            self._done = torch.cuda.Event()
            self._done.record()

    def wait(self) -> list[torch.Tensor]:
        if self._done is not None:
            self._done.synchronize()
        return self._tensors
