"""/metrics after real requests through the openai client: vLLM's names (tokmodel: for vllm:), types, label sets
and buckets (vllm/v1/metrics/buckets.py), and values that add up to what the client saw, as vLLM's own
tests/entrypoints/openai/test_metrics.py checks them."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_fixtures import REPO, Server, leaves_server_idle, openai_client, running_server  # noqa: F401 (autouse)

MAX_MODEL_LEN = 1024
NUM_BLOCKS = 8  # 128 tokens of KV cache: two long requests at once must preempt one another
PROMPT = "Hello my name is Robert and I love magic"
TIME_TO_FIRST_TOKEN = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
INTER_TOKEN = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0]
REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]
TOKENS_1_2_5 = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]  # vLLM's build_1_2_5_buckets(max_model_len=1024)
HISTOGRAMS = {  # name: buckets, from vLLM's PrometheusStatLogger
    "time_to_first_token_seconds": TIME_TO_FIRST_TOKEN, "inter_token_latency_seconds": INTER_TOKEN,
    "request_time_per_output_token_seconds": INTER_TOKEN, "e2e_request_latency_seconds": REQUEST_LATENCY,
    "request_queue_time_seconds": REQUEST_LATENCY, "request_inference_time_seconds": REQUEST_LATENCY,
    "request_prefill_time_seconds": REQUEST_LATENCY, "request_decode_time_seconds": REQUEST_LATENCY,
    "request_prompt_tokens": TOKENS_1_2_5, "request_generation_tokens": TOKENS_1_2_5,
    "request_max_num_generation_tokens": TOKENS_1_2_5, "request_params_max_tokens": TOKENS_1_2_5,
    "request_params_n": [1, 2, 5, 10, 20], "request_num_preemptions": [1, 2, 3, 4, 5, 10, 20],
    "iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
}
COUNTERS = ["num_preemptions", "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens"]
GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"]
LABELS = {"model_name", "engine"}


@pytest.fixture(scope="module")
def server() -> Server:
    with running_server("--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", str(NUM_BLOCKS)) as s:
        yield s


def scrape(server: Server) -> dict:
    text = server.request("GET", "/metrics").body.decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels: str) -> float:
    """The one sample of that name with those labels (among others), summed over finished_reason."""
    matches = [s.value for family in families.values() for s in family.samples
               if s.name == sample_name and labels.items() <= s.labels.items()]
    assert matches, (sample_name, labels)
    return sum(matches)


def delta(before: dict, after: dict, sample_name: str, **labels: str) -> float:
    return value(after, sample_name, **labels) - value(before, sample_name, **labels)


def test_every_vllm_metric_has_its_type_labels_and_buckets(server):
    client = openai_client(server)
    client.completions.create(model=client.models.list().data[0].id, prompt="Hello, my name is", max_tokens=5,
                              temperature=0.0)
    families = scrape(server)
    model = client.models.list().data[0].id
    gauges = GAUGES + ["num_requests_waiting_by_reason", "cache_config_info"]
    expected_types = ({f"tokmodel:{name}": "gauge" for name in gauges}
                      | {f"tokmodel:{name}": "counter" for name in COUNTERS + ["request_success"]}
                      | {f"tokmodel:{name}": "histogram" for name in HISTOGRAMS})
    for name, kind in expected_types.items():
        assert families[name].type == kind, name
    for name in GAUGES + COUNTERS + list(HISTOGRAMS):
        for sample in families[f"tokmodel:{name}"].samples:
            assert set(sample.labels) - {"le"} == LABELS and sample.labels["model_name"] == model, sample
            assert sample.labels["engine"] == "0"
    for name, buckets in HISTOGRAMS.items():
        bounds = [float(s.labels["le"]) for s in families[f"tokmodel:{name}"].samples if s.name.endswith("_bucket")]
        assert bounds == [*buckets, float("inf")], name
    reasons = {s.labels["reason"]: s.value for s in families["tokmodel:num_requests_waiting_by_reason"].samples}
    assert set(reasons) == {"capacity", "deferred"}
    assert {s.labels["finished_reason"] for s in families["tokmodel:request_success"].samples} >= {"length"}
    (info,) = families["tokmodel:cache_config_info"].samples
    assert info.value == 1 and info.labels["num_gpu_blocks"] == str(NUM_BLOCKS) and info.labels["block_size"] == "16"
    assert info.labels["engine"] == "0"
    # vLLM's exposition names: counters end in _total, histograms have _bucket, _sum and _count.
    text = server.request("GET", "/metrics").body.decode()
    for name in ["prompt_tokens_total", "generation_tokens_total", "num_preemptions_total", "request_success_total",
                 "iteration_tokens_total_bucket", "request_prompt_tokens_sum", "request_params_n_count"]:
        assert f"tokmodel:{name}{{" in text, name


def test_values_add_up_to_what_the_client_saw(server, tokenizer):
    """vLLM's test_metrics_counts: sequential requests of a token-id prompt, each running to max_tokens."""
    client = openai_client(server)
    model = client.models.list().data[0].id
    prompt_ids = tokenizer.encode(PROMPT)
    num_requests, max_tokens = 3, 6
    before = scrape(server)
    usages = [client.completions.create(model=model, prompt=prompt_ids, max_tokens=max_tokens, temperature=0.0,
                                        extra_body={"ignore_eos": True}).usage for _ in range(num_requests)]
    after = scrape(server)
    prompt_tokens = sum(u.prompt_tokens for u in usages)
    completion_tokens = sum(u.completion_tokens for u in usages)
    assert prompt_tokens == num_requests * len(prompt_ids) and completion_tokens == num_requests * max_tokens
    expected = {
        "tokmodel:request_prompt_tokens_sum": prompt_tokens, "tokmodel:request_prompt_tokens_count": num_requests,
        "tokmodel:request_generation_tokens_sum": completion_tokens,
        "tokmodel:request_generation_tokens_count": num_requests,
        "tokmodel:request_max_num_generation_tokens_sum": completion_tokens,
        "tokmodel:request_params_n_sum": num_requests, "tokmodel:request_params_n_count": num_requests,
        "tokmodel:request_params_max_tokens_sum": num_requests * max_tokens,
        "tokmodel:iteration_tokens_total_sum": prompt_tokens + completion_tokens,
        "tokmodel:iteration_tokens_total_count": completion_tokens,  # one step per token, one request at a time
        "tokmodel:prompt_tokens_total": prompt_tokens, "tokmodel:generation_tokens_total": completion_tokens,
        "tokmodel:request_success_total": num_requests,
        "tokmodel:inter_token_latency_seconds_count": num_requests * (max_tokens - 1),
        "tokmodel:request_num_preemptions_sum": 0,
    }
    for phase in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "request_inference_time",
                  "request_prefill_time", "request_decode_time", "request_time_per_output_token"):
        expected[f"tokmodel:{phase}_seconds_count"] = num_requests
    for sample_name, expected_value in expected.items():
        assert delta(before, after, sample_name) == expected_value, sample_name
    # The phases partition a request's time: running = prefill + decode, and arrival to finish holds them all.
    phase = {name: delta(before, after, f"tokmodel:request_{name}_time_seconds_sum")
             for name in ("queue", "prefill", "decode", "inference")}
    assert phase["inference"] == pytest.approx(phase["prefill"] + phase["decode"])
    e2e = delta(before, after, "tokmodel:e2e_request_latency_seconds_sum")
    assert e2e >= phase["queue"] + phase["inference"] > 0
    tpot = delta(before, after, "tokmodel:request_time_per_output_token_seconds_sum")
    assert tpot * (max_tokens - 1) == pytest.approx(phase["decode"])
    # Buckets are cumulative (le): the requests land in every bucket from their prompt length's up, none below.
    for bound in [*TOKENS_1_2_5, float("inf")]:
        landed = delta(before, after, "tokmodel:request_prompt_tokens_bucket", le=_le(bound))
        assert landed == (num_requests if bound >= len(prompt_ids) else 0), bound


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(float(bound))


def test_preemptions_are_counted_per_request_and_in_total(server, tokenizer):
    """Two requests that together need more than the cache's 128 tokens: one is preempted and resumes."""
    client = openai_client(server)
    model = client.models.list().data[0].id
    before = scrape(server)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: client.completions.create(
            model=model, prompt=PROMPT, max_tokens=90, temperature=0.0, extra_body={"ignore_eos": True}), range(2)))
    after = scrape(server)
    assert all(r.usage.completion_tokens == 90 for r in results)
    preemptions = delta(before, after, "tokmodel:num_preemptions_total")
    assert preemptions >= 1
    assert delta(before, after, "tokmodel:request_num_preemptions_sum") == preemptions
    assert delta(before, after, "tokmodel:request_num_preemptions_count") == 2


def test_the_grafana_dashboard_queries_only_metrics_the_server_exposes(server):
    """examples/grafana.json is vLLM's dashboard layout on TokModel's names: every series it queries exists."""
    dashboard = json.loads((REPO / "examples" / "grafana.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 20
    queried = {name for expr in exprs for name in re.findall(r"(tokmodel:[a-z0-9_]+)", expr)}
    exposed = {sample.name for family in scrape(server).values() for sample in family.samples}
    assert queried and queried <= exposed, queried - exposed
    assert not any("vllm:" in expr for expr in exprs)
