"""CUDA graphs for decode steps. A decode step of a small model is a few hundred short kernels whose launches
cost more host time than they run; a graph launches them all at once. Each captured batch size replays the
forward on the step buffers' fixed addresses, so a step is padded up to the next captured size. The shapes,
the Python ints of the attention metadata (so the decode split count) and every intermediate buffer (the
graph's memory pool) are fixed at capture."""
from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (and max_num_seqs itself), at most MAX_CAPTURE_SIZE: as vLLM."""
    limit = min(max_num_seqs, MAX_CAPTURE_SIZE)
    return sorted({size for size in (1, 2, 4, *range(8, limit + 1, 8)) if size <= limit} | {limit})


class DecodeGraphs:
    """The decode batch sizes a step is padded to, and the graphs captured for them (none: the padded step runs
    eagerly on the same buffers, as tests on a CPU do; no sizes: no padding)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # one memory pool for all: only one graph runs at a time

    @property
    def num_captured(self) -> int:
        return len(self._graphs)

    def padded_size(self, num_seqs: int) -> int:
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[index] if index < len(self.sizes) else num_seqs

    def capture(self, size: int, forward: Callable[[], torch.Tensor]) -> None:
        """Capture forward() (which reads the step buffers as a decode of `size` rows). Capture the largest size
        first: later graphs reuse its memory."""
        forward()  # compiles what is left to compile and settles the allocator outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = forward()
        self._pool = graph.pool()
        self._graphs[size] = (graph, out)

    def replay(self, size: int) -> torch.Tensor | None:
        """The hidden states [size, hidden] of the graph for `size`, after replaying it; None if none was captured."""
        captured = self._graphs.get(size)
        if captured is None:
            return None
        graph, out = captured
        graph.replay()
        return out
