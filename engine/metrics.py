"""Engine statistics for /metrics and benchmarks, named after vLLM's metrics."""
from __future__ import annotations

from dataclasses import dataclass, fields


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

    @classmethod
    def total(cls, engines: list[EngineStats]) -> EngineStats:
        """Several engine cores' stats as one: counts summed, KV-cache usage averaged."""
        total = cls(**{f.name: sum(getattr(e, f.name) for e in engines) for f in fields(cls)})
        total.kv_cache_usage /= max(1, len(engines))
        return total
