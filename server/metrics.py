"""Prometheus metrics under vLLM's names with the prefix tokmodel: and a model_name label.

Engine gauges and counters are read from llm.get_stats() at scrape time (the engine keeps them cumulative);
latency histograms and request outcomes are observed here as requests finish."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.outputs import RequestOutput

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)
_ENGINE_GAUGES = {"num_requests_running": ("num_running_reqs", "Requests in the running batch."),
                  "num_requests_waiting": ("num_waiting_reqs", "Requests waiting to be scheduled."),
                  "kv_cache_usage_perc": ("kv_cache_usage", "Fraction of KV-cache blocks held by live requests.")}
_ENGINE_COUNTERS = {"num_preemptions": ("num_preemptions", "Preemptions of running requests."),
                    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
                    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
                    "prompt_tokens": ("num_prompt_tokens", "Prefill tokens processed."),
                    "generation_tokens": ("num_generation_tokens", "Tokens generated.")}


class _EngineStatsCollector:
    def __init__(self, llm: AsyncLLM, model_name: str) -> None:
        self.llm = llm
        self.model_name = model_name

    def collect(self):
        """One sample per engine core, labelled engine="<index>" as vLLM's (data-parallel replicas: several)."""
        engines = list(enumerate(self.llm.get_engine_stats()))
        for name, (field, doc) in _ENGINE_GAUGES.items():
            family = GaugeMetricFamily(f"tokmodel:{name}", doc, labels=["model_name", "engine"])
            for index, stats in engines:
                family.add_metric([self.model_name, str(index)], getattr(stats, field))
            yield family
        for name, (field, doc) in _ENGINE_COUNTERS.items():
            family = CounterMetricFamily(f"tokmodel:{name}", doc, labels=["model_name", "engine"])
            for index, stats in engines:
                family.add_metric([self.model_name, str(index)], getattr(stats, field))
            yield family


class ServerMetrics:
    """One registry per server, so that several apps in one process (tests) never collide."""

    def __init__(self, llm: AsyncLLM, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(llm, model_name))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(f"tokmodel:{name}", doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens of a choice.", _LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds", "Mean time per output token after the first.",
                              _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.", _REQUEST_BUCKETS)
        self.success = Counter("tokmodel:request_success", "Requests finished, by reason (abort: cut off).",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.model_name = model_name

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Observes one engine request's outputs: ITL as the server sees the tokens arrive, the rest from
    the engine's timestamps when the request finishes; its token counts and finish reasons, for its log line.
    A request counts once, as the latency histograms do, under the finish reason of its last choice to end;
    one that never finishes counts as "abort"."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.last_token_time: dict[int, float] = {}
        self.num_prompt_tokens = 0
        self.num_tokens = 0
        self.finish_reasons: dict[int, str] = {}  # by choice index, for the request's log line
        self.counted = False

    def refused(self) -> None:
        """The engine refused the request before it started: it never was one, it does not count."""
        self.counted = True

    def close(self) -> None:
        """The request's stream is closed: if it never finished (its client went away), it was aborted."""
        if not self.counted:
            self._count("abort")

    def observe(self, out: RequestOutput) -> None:
        now = time.time()
        self.num_prompt_tokens = len(out.prompt_token_ids)
        for choice in out.outputs:
            new_tokens = len(choice.token_ids)
            self.num_tokens += new_tokens
            last = self.last_token_time.get(choice.index)
            if last is not None and new_tokens:
                gap = (now - last) / new_tokens  # a delta with several tokens: they shared the gap
                for _ in range(new_tokens):
                    self.metrics.itl.observe(gap)
            if new_tokens:
                self.last_token_time[choice.index] = now
            if choice.finish_reason is not None:
                self.finish_reasons[choice.index] = choice.finish_reason
        if out.finished:
            self._count([choice.finish_reason for choice in out.outputs if choice.finish_reason][-1])
            self._observe_request(out.metrics)

    def _count(self, finish_reason: str) -> None:
        self.counted = True
        self.metrics.success.labels(self.metrics.model_name, finish_reason).inc()

    def _observe_request(self, times: dict[str, float]) -> None:
        arrival, first_token, finished = times.get("arrival_time"), times.get("first_token_time"), times.get("finished_time")
        if arrival is None or first_token is None or finished is None:
            return
        self.metrics.ttft.observe(first_token - arrival)
        self.metrics.e2e.observe(finished - arrival)
        if "first_scheduled_time" in times:
            self.metrics.queue.observe(times["first_scheduled_time"] - arrival)
        choices = max(len(self.last_token_time), 1)
        decode_tokens = self.num_tokens - choices
        if decode_tokens > 0:
            self.metrics.tpot.observe((finished - first_token) / decode_tokens * choices)
