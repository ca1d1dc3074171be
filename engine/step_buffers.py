"""A step's input tensors at fixed addresses: one pinned host buffer that NumPy fills, mirrored on the device
and moved by one non-blocking copy per step. Fixed addresses are what a CUDA graph replays; one copy instead of
seven keeps the step's launches few. On the CPU the two sides are one buffer."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

ALIGN = 64  # bytes: each field starts on a cache line (and a 16-byte boundary, which kernels' wide loads want)


class StepTensors(NamedTuple):
    input_ids: object  # [max_tokens] int64
    positions: object  # [max_tokens] int64
    slot_mapping: object  # [max_tokens] int64; -1: a padding token, written nowhere
    sample_index: object  # [max_seqs] int64: the token whose hidden state each sampled row reads
    seq_lens: object  # [max_seqs] int32
    query_start_loc: object  # [max_seqs + 1] int32
    block_tables: object  # [max_seqs, max_blocks_per_seq] int32, last: a step copies only its rows


class StepBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        shapes = StepTensors((max_tokens,), (max_tokens,), (max_tokens,), (max_seqs,), (max_seqs,), (max_seqs + 1,),
                             (max_seqs, max_blocks_per_seq))
        dtypes = StepTensors(*[torch.int64] * 4, *[torch.int32] * 3)
        offsets, end = [], 0
        for shape, dtype in zip(shapes, dtypes):
            offsets.append(end)
            end += -(-int(np.prod(shape)) * dtype.itemsize // ALIGN) * ALIGN
        self._host = torch.zeros(end, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self._device = self._host if device.type == "cpu" else torch.zeros(end, dtype=torch.uint8, device=device)
        self._block_tables_offset, self._row_bytes = offsets[-1], max_blocks_per_seq * 4
        host, dev = [], []
        for offset, shape, dtype in zip(offsets, shapes, dtypes):
            size = int(np.prod(shape)) * dtype.itemsize
            host.append(self._host[offset:offset + size].view(dtype).view(shape))
            dev.append(self._device[offset:offset + size].view(dtype).view(shape))
        self.np = StepTensors(*[t.numpy() for t in host])  # the host side, for NumPy to fill
        self.dev = StepTensors(*dev)  # the device side, for the model
        self._copied: torch.cuda.Event | None = None

    def wait_for_copy(self) -> None:
        """The last step's copy reads the pinned buffer after it was queued: wait for it before writing again."""
        if self._copied is not None:
            self._copied.synchronize()

    def copy_to_device(self, num_block_rows: int) -> None:
        """Every field but the block table whole (small), and of the block table the first num_block_rows rows."""
        if self._device is self._host:
            return
        used = self._block_tables_offset + num_block_rows * self._row_bytes
        self._device[:used].copy_(self._host[:used], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
