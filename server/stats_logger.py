"""While the engine is busy, a line every interval on throughput and cache use, as vLLM's LoggingStatLogger."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from engine.metrics import EngineStats

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM

logger = logging.getLogger("tokmodel.stats")


async def log_stats(llm: AsyncLLM, interval_s: float) -> None:
    """Runs until cancelled. Idle intervals log nothing, except the first after work, which shows it ended."""
    last, last_time = llm.get_stats(), time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now, now_time = llm.get_stats(), time.monotonic()
        worked = now.num_prompt_tokens + now.num_generation_tokens > last.num_prompt_tokens + last.num_generation_tokens
        if worked or now.num_running_reqs or now.num_waiting_reqs:
            logger.info(stats_line(last, now, now_time - last_time))
        last, last_time = now, now_time


def stats_line(last: EngineStats, now: EngineStats, elapsed_s: float) -> str:
    """Throughputs and the prefix-cache hit rate over the interval between two snapshots; gauges as of `now`."""
    queries = now.prefix_cache_queries - last.prefix_cache_queries
    hits = now.prefix_cache_hits - last.prefix_cache_hits
    return (f"Avg prompt throughput: {(now.num_prompt_tokens - last.num_prompt_tokens) / elapsed_s:.1f} tokens/s, "
            f"Avg generation throughput: {(now.num_generation_tokens - last.num_generation_tokens) / elapsed_s:.1f} "
            f"tokens/s, Running: {now.num_running_reqs} reqs, Waiting: {now.num_waiting_reqs} reqs, "
            f"GPU KV cache usage: {now.kv_cache_usage * 100:.1f}%, "
            f"Prefix cache hit rate: {hits / queries * 100 if queries else 0.0:.1f}%")
