"""Engine statistics for /metrics and benchmarks, named after vLLM's metrics."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields

# vLLM's buckets for tokens per engine step (vllm/v1/metrics/buckets.py: ITERATION_TOKENS_BUCKETS).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class HistogramCounts:
    """A histogram kept where it is observed (the engine thread) and read elsewhere as a copy: one count per
    bound (values <= bound and > the bound before) and one past the last, with the sum of all values."""
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def copy(self) -> HistogramCounts:
        return HistogramCounts(self.bounds, list(self.counts), self.total)

    @classmethod
    def sum(cls, histograms: list[HistogramCounts]) -> HistogramCounts:
        """Histograms of the same bounds as one."""
        return cls(histograms[0].bounds, [sum(counts) for counts in zip(*(h.counts for h in histograms))],
                   sum(h.total for h in histograms))


@dataclass
class EngineStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # blocks held by live requests; idle cached blocks count as free
    num_preemptions: int = 0  # cumulative counters from here on
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found there
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # Per step that produced tokens: the prompt tokens of the requests it prefilled plus the tokens it sampled.
    iteration_tokens: HistogramCounts = field(default_factory=lambda: HistogramCounts(ITERATION_TOKENS_BUCKETS))

    @classmethod
    def total(cls, engines: list[EngineStats]) -> EngineStats:
        """Several engine cores' stats as one: counts summed, KV-cache usage averaged."""
        numbers = {f.name: sum(getattr(e, f.name) for e in engines) for f in fields(cls) if f.name != "iteration_tokens"}
        numbers["kv_cache_usage"] /= len(engines)
        return cls(**numbers, iteration_tokens=HistogramCounts.sum([e.iteration_tokens for e in engines]))
