"""The server over raw HTTP: error statuses and shapes, queue limit, disconnects, metrics, tokenizer endpoints."""
from __future__ import annotations

import json

import pytest

from server_fixtures import Server, leaves_server_idle, running_server, validate  # noqa: F401 (autouse fixture)

API_KEY = "test-key"
MAX_MODEL_LEN = 512
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]
LONG = {"messages": MESSAGES, "max_tokens": 400, "ignore_eos": True}  # far longer than any test waits for


@pytest.fixture(scope="module")
def server() -> Server:
    # Two running and two waiting requests at most, so that a burst of requests meets the queue limit.
    with running_server("--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "2", "--max-waiting-requests", "2",
                        api_key=API_KEY) as s:
        yield s


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status == status, response.body
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "temperature": 2.5}, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, "top_p"),
    ({"messages": MESSAGES, "n": 0}, "n"),
    ({"messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
    ({"messages": MESSAGES, "max_completion_tokens": True}, "max_completion_tokens"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": MESSAGES, "stop": [1, 2]}, "stop"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": 5, "content": "hi"}]}, "messages"),  # other roles go to the template (as vLLM)
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
])
def test_invalid_chat_parameter_is_a_400_naming_it(server, body, param):
    assert_error(server.post(CHAT, body), 400, param)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_body_is_a_400(server, body):
    assert_error(server.post(CHAT, body), 400)


def test_invalid_completion_prompt_is_a_400_naming_it(server):
    for prompt in ([], [[]], [1.5], [[1], "a"], None, [-1]):
        assert_error(server.post("/v1/completions", {"prompt": prompt}), 400, "prompt")


def test_prompt_plus_max_tokens_over_the_context_is_a_400_saying_both_numbers(server):
    error = assert_error(server.post(CHAT, {"messages": MESSAGES, "max_tokens": 100_000}), 400)
    assert "100000" in error["message"] and str(MAX_MODEL_LEN) in error["message"]


def test_unknown_model_is_a_404_on_model(server):
    error = assert_error(server.post(CHAT, {"model": "gpt-9", "messages": MESSAGES}), 404, "model")
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", API_KEY])
def test_missing_or_wrong_api_key_is_a_401(server, authorization):
    headers = {"Content-Type": "application/json"} | ({"Authorization": authorization} if authorization else {})
    assert_error(server.request("POST", CHAT, {"messages": MESSAGES}, headers=headers), 401)


def test_probes_need_no_api_key(server):
    for path in ("/health", "/version", "/metrics"):
        assert server.request("GET", path, headers={}).status == 200


def test_wrong_method_is_a_405_and_unknown_path_a_404(server):
    response = server.request("GET", CHAT)
    assert_error(response, 405)
    assert response.headers["Allow"] == "POST"
    assert_error(server.request("GET", "/v1/nothing"), 404)


def test_oversized_body_is_a_413(server):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (17 * 1024 * 1024)}]}).encode()
    assert_error(server.post(CHAT, body), 413)


def test_full_waiting_queue_answers_429_with_retry_after(server):
    clients = [server.send(CHAT, LONG) for _ in range(5)]
    try:
        server.wait_for("tokmodel:num_requests_waiting", 2)  # two run (--max-num-seqs 2), the rest wait
        response = server.post(CHAT, {"messages": MESSAGES, "max_tokens": 2})
    finally:  # pass or fail, the clients leave and take their requests with them
        for client in clients:
            client.close()
    assert_error(response, 429)
    assert int(response.headers["Retry-After"]) >= 1


def test_bad_requests_do_not_disturb_one_in_flight(server):
    events = server.stream(CHAT, {"messages": MESSAGES, "max_tokens": 12, "ignore_eos": True, "stream": True})
    first = next(events)
    for _ in range(5):
        assert_error(server.post(CHAT, b"{"), 400)
        assert_error(server.post(CHAT, {"messages": MESSAGES, "max_tokens": 100_000}), 400)
    rest = list(events)
    assert rest[-1] == "[DONE]"
    chunks = [first, *rest[:-1]]
    assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == ["length"]


def test_streaming_client_disconnect_aborts_the_request_and_frees_its_blocks(server):
    events = server.stream(CHAT, LONG | {"stream": True})
    next(events), next(events)
    assert server.gauge("tokmodel:num_requests_running") == 1
    assert server.gauge("tokmodel:kv_cache_usage_perc") > 0
    events.close()  # the client goes away mid-stream
    server.wait_until_idle(timeout=5)


def test_non_streaming_client_disconnect_aborts_the_request_and_frees_its_blocks(server):
    client = server.send(CHAT, LONG)
    server.wait_for("tokmodel:num_requests_running", 1)
    client.close()
    server.wait_until_idle(timeout=5)


def test_metrics_use_vllm_names_with_the_tokmodel_prefix_and_model_label(server):
    assert server.post(CHAT, {"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True}).status == 200
    model = server.request("GET", "/v1/models").json()["data"][0]["id"]
    metrics = server.metrics()
    gauges = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"]
    counters = ["num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
                "prompt_tokens_total", "generation_tokens_total", "request_success_total"]
    histograms = ["time_to_first_token_seconds", "inter_token_latency_seconds",
                  "request_time_per_output_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"]
    for name in gauges + counters + [f"{h}_count" for h in histograms]:
        samples = metrics[f"tokmodel:{name}"]
        assert all(s.labels["model_name"] == model for s in samples), name
    for name in histograms:
        assert metrics[f"tokmodel:{name}_count"][0].value >= 1, name
    assert metrics["tokmodel:prompt_tokens_total"][0].value > 0
    assert metrics["tokmodel:generation_tokens_total"][0].value >= 3
    finished = {s.labels["finished_reason"]: s.value for s in metrics["tokmodel:request_success_total"]}
    assert finished["length"] >= 1


def finished_requests(server: Server) -> dict[str, float]:
    return {s.labels["finished_reason"]: s.value for s in server.metrics().get("tokmodel:request_success_total", [])}


def test_request_success_counts_requests_not_choices_and_disconnects_as_aborts(server):
    before = finished_requests(server)
    assert server.post(CHAT, {"messages": MESSAGES, "n": 2, "max_tokens": 3, "ignore_eos": True}).status == 200
    client = server.send(CHAT, LONG)
    server.wait_for("tokmodel:num_requests_running", 1)
    client.close()
    server.wait_until_idle(timeout=5)
    after = finished_requests(server)
    assert after.get("length", 0) - before.get("length", 0) == 1, "one request of two choices counts once"
    assert after.get("abort", 0) - before.get("abort", 0) == 1, "a client that went away counts as abort"
    time_to_first_token = server.metrics()["tokmodel:time_to_first_token_seconds_count"][0].value
    assert time_to_first_token == sum(after.values()) - after.get("abort", 0)


def test_tokenize_and_detokenize_round_trip(server):
    tokenized = server.post("/tokenize", {"prompt": "Hello world"}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) > 0 and tokenized["max_model_len"] == MAX_MODEL_LEN
    assert server.post("/detokenize", {"tokens": tokenized["tokens"]}).json() == {"prompt": "Hello world"}
    chat = server.post("/tokenize", {"messages": [{"role": "user", "content": "Hello world"}]}).json()
    assert chat["count"] > tokenized["count"]  # the template adds role markers and the generation prompt
    assert_error(server.post("/detokenize", {"tokens": [-1]}), 400, "tokens")


def test_models_health_and_version(server):
    models = server.request("GET", "/v1/models").json()
    validate(models, "ListModelsResponse")
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert server.request("GET", "/health").status == 200
    assert isinstance(server.request("GET", "/version").json()["version"], str)
