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
