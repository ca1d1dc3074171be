"""Prometheus metrics with vLLM's names, types, labels (model_name, engine) and buckets, under the prefix tokmodel:.

Engine gauges, counters and the per-step histogram are read from llm.get_stats() at scrape time (the engine keeps
them cumulative); per-request histograms are observed here as requests finish, from the timestamps the engine
takes when a request changes state (arrival, first scheduled, first token, last token, finished)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from engine.metrics import HistogramCounts
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM

# vLLM's bucket families (vllm/v1/metrics/buckets.py).
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
REQUEST_NUM_PREEMPTIONS_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
LABELS = ("model_name", "engine")
# The front end's own series (request histograms, cache config); engine series carry each engine core's index.
ENGINE_INDEX = "0"

_ENGINE_GAUGES = {"num_requests_running": ("num_running_reqs", "Number of requests in model execution batches."),
                  "num_requests_waiting": ("num_waiting_reqs", "Number of requests waiting to be processed."),
                  "kv_cache_usage_perc": ("kv_cache_usage", "KV-cache usage. 1 means 100 percent usage.")}
_ENGINE_COUNTERS = {"num_preemptions": ("num_preemptions", "Cumulative number of preemption from the engine."),
                    "prefix_cache_queries": ("prefix_cache_queries",
                                             "Prefix cache queries, in terms of number of queried tokens."),
                    "prefix_cache_hits": ("prefix_cache_hits",
                                          "Prefix cache hits, in terms of number of cached tokens."),
                    "prompt_tokens": ("num_prompt_tokens", "Number of prefill tokens processed."),
                    "generation_tokens": ("num_generation_tokens", "Number of generation tokens processed.")}


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class _EngineStatsCollector:
    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm
        config = llm.config
        # vLLM's cache_config_info: a gauge fixed at 1 whose labels carry the cache configuration (and engine).
        self.cache_config = {"block_size": config.block_size, "cache_dtype": "auto",
                             "enable_prefix_caching": config.enable_prefix_caching,
                             "gpu_memory_utilization": config.gpu_memory_utilization,
                             "num_gpu_blocks": llm.num_kv_blocks,
                             "num_gpu_blocks_override": config.num_gpu_blocks_override, "engine": ENGINE_INDEX}

    def collect(self):
        """Engine series: one sample per engine core, labelled engine="<index>" as vLLM's (several with
        data-parallel replicas)."""
        engines = [([self.llm.model_name, str(i)], stats) for i, stats in enumerate(self.llm.get_engine_stats())]
        for name, (field, doc) in _ENGINE_GAUGES.items():
            yield self._family(GaugeMetricFamily, name, doc, [(labels, getattr(s, field)) for labels, s in engines])
        for name, (field, doc) in _ENGINE_COUNTERS.items():
            yield self._family(CounterMetricFamily, name, doc, [(labels, getattr(s, field)) for labels, s in engines])
        # TokModel defers no waiting request for a transient reason (vLLM's "deferred"): all wait for capacity.
        by_reason = GaugeMetricFamily("tokmodel:num_requests_waiting_by_reason",
                                      "Number of requests waiting, by the reason they wait.",
                                      labels=[*LABELS, "reason"])
        for labels, stats in engines:
            by_reason.add_metric([*labels, "capacity"], stats.num_waiting_reqs)
            by_reason.add_metric([*labels, "deferred"], 0)
        yield by_reason
        yield self._histogram("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                              [(labels, stats.iteration_tokens) for labels, stats in engines])
        info = GaugeMetricFamily("tokmodel:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=list(self.cache_config))
        info.add_metric([str(value) for value in self.cache_config.values()], 1)
        yield info

    @staticmethod
    def _family(family_type, name: str, doc: str, samples: list[tuple[list[str], float]]):
        family = family_type(f"tokmodel:{name}", doc, labels=LABELS)
        for labels, value in samples:
            family.add_metric(labels, value)
        return family

    @staticmethod
    def _histogram(name: str, doc: str, histograms: list[tuple[list[str], HistogramCounts]]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(f"tokmodel:{name}", doc, labels=LABELS)
        for labels, histogram in histograms:
            cumulative, buckets = 0, []
            for bound, count in zip((*histogram.bounds, float("inf")), histogram.counts):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(labels, buckets, histogram.total)
        return family


_TOKENS = None  # buckets 1, 2, 5, 10, ... up to max_model_len, as vLLM's token-count histograms
_REQUEST_HISTOGRAMS = {  # vLLM's name: its help text and buckets
    "time_to_first_token_seconds": ("Histogram of time to first token in seconds.", TIME_TO_FIRST_TOKEN_BUCKETS),
    "inter_token_latency_seconds": ("Histogram of inter-token latency in seconds.", INTER_TOKEN_LATENCY_BUCKETS),
    "request_time_per_output_token_seconds": ("Histogram of time_per_output_token_seconds per request.",
                                              INTER_TOKEN_LATENCY_BUCKETS),
    "e2e_request_latency_seconds": ("Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS),
    "request_queue_time_seconds": ("Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS),
    "request_inference_time_seconds": ("Histogram of time spent in RUNNING phase for request.",
                                       REQUEST_LATENCY_BUCKETS),
    "request_prefill_time_seconds": ("Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS),
    "request_decode_time_seconds": ("Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS),
    "request_prompt_tokens": ("Number of prefill tokens processed.", _TOKENS),
    "request_generation_tokens": ("Number of generation tokens processed.", _TOKENS),
    "request_max_num_generation_tokens": ("Histogram of maximum number of requested generation tokens.", _TOKENS),
    "request_params_n": ("Histogram of the n request parameter.", REQUEST_PARAMS_N_BUCKETS),
    "request_params_max_tokens": ("Histogram of the max_tokens request parameter.", _TOKENS),
    "request_num_preemptions": ("Number of preemptions per finished request.", REQUEST_NUM_PREEMPTIONS_BUCKETS),
}


class ServerMetrics:
    """One registry per server, so that several apps in one process (tests) never collide."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(llm))
        self.labels = (llm.model_name, ENGINE_INDEX)
        self.max_model_len = llm.max_model_len
        token_buckets = build_1_2_5_buckets(llm.max_model_len)
        self.histograms = {
            name: Histogram(f"tokmodel:{name}", doc, LABELS, buckets=buckets or token_buckets,
                            registry=self.registry).labels(*self.labels)
            for name, (doc, buckets) in _REQUEST_HISTOGRAMS.items()}
        self.success = Counter("tokmodel:request_success", "Count of successfully processed requests.",
                               [*LABELS, "finished_reason"], registry=self.registry)

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, params: SamplingParams) -> RequestTracker:
        return RequestTracker(self, params)


class RequestTracker:
    """Observes one engine request's outputs: ITL as the server sees the tokens arrive, the rest from the
    engine's timestamps when the request finishes; its token counts and finish reasons, for its log line.
    A request counts once, as the per-request histograms do, under the finish reason of its last choice to end;
    one that never finishes counts as "abort"."""

    def __init__(self, metrics: ServerMetrics, params: SamplingParams) -> None:
        self.metrics = metrics
        self.params = params
        self.last_token_time: dict[int, float] = {}
        self.num_prompt_tokens = 0
        self.choice_tokens: dict[int, int] = {}  # tokens per choice index
        self.finish_reasons: dict[int, str] = {}  # by choice index, for the request's log line
        self.counted = False

    @property
    def num_tokens(self) -> int:
        return sum(self.choice_tokens.values())

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
            self.choice_tokens[choice.index] = self.choice_tokens.get(choice.index, 0) + new_tokens
            last = self.last_token_time.get(choice.index)
            if last is not None and new_tokens:
                gap = (now - last) / new_tokens  # a delta with several tokens: they shared the gap
                for _ in range(new_tokens):
                    self.metrics.observe("inter_token_latency_seconds", gap)
            if new_tokens:
                self.last_token_time[choice.index] = now
            if choice.finish_reason is not None:
                self.finish_reasons[choice.index] = choice.finish_reason
        if out.finished:
            self._count([choice.finish_reason for choice in out.outputs if choice.finish_reason][-1])
            self._observe_request(out.metrics)

    def _count(self, finish_reason: str) -> None:
        self.counted = True
        self.metrics.success.labels(*self.metrics.labels, finish_reason).inc()

    def _observe_request(self, times: dict[str, float]) -> None:
        """vLLM's phases: queued (arrival to first scheduled), prefill (to the first token), decode (first to last
        token), inference (prefill and decode). A request that ended before its first token has no phases."""
        if times.get("first_token_time") is None:
            return
        arrival, scheduled = times["arrival_time"], times["first_scheduled_time"]
        first_token, last_token = times["first_token_time"], times["last_token_time"]
        m = self.metrics
        m.observe("time_to_first_token_seconds", first_token - arrival)
        m.observe("e2e_request_latency_seconds", times["finished_time"] - arrival)
        m.observe("request_queue_time_seconds", scheduled - arrival)
        m.observe("request_prefill_time_seconds", first_token - scheduled)
        m.observe("request_decode_time_seconds", last_token - first_token)
        m.observe("request_inference_time_seconds", last_token - scheduled)
        longest = max(self.choice_tokens.values())  # choices decode side by side: the longest sets the pace
        m.observe("request_time_per_output_token_seconds",
                  (last_token - first_token) / (longest - 1) if longest > 1 else 0.0)
        m.observe("request_prompt_tokens", self.num_prompt_tokens)
        m.observe("request_generation_tokens", self.num_tokens)
        m.observe("request_max_num_generation_tokens", longest)
        m.observe("request_params_n", self.params.n)
        max_tokens = self.params.max_tokens
        m.observe("request_params_max_tokens",
                  max_tokens if max_tokens is not None else m.max_model_len - self.num_prompt_tokens)
        m.observe("request_num_preemptions", times["num_preemptions"])
