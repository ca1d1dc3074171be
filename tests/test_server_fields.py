"""Every request field is honoured or refused with a 400 naming it, every number is bounded, and hostile bodies
(NaN, deep nesting, huge numbers) are 400s that leave the requests in flight untouched."""
from __future__ import annotations

import json
import uuid

import openai
import pytest

from server_fixtures import Server, leaves_server_idle, openai_client, running_server, validate  # noqa: F401 (autouse fixture)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = [{"role": "user", "content": "Hello"}]
CHAT_BODY = {"messages": MESSAGES, "max_tokens": 2}
COMPLETION_BODY = {"prompt": "Hello", "max_tokens": 2}
RESPONSE_BODY = {"input": "Hello", "max_output_tokens": 2}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server() -> Server:
    with running_server("--max-model-len", "512", "--max-num-seqs", "4") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture(scope="module")
def vocab_size(tokenizer) -> int:
    return len(tokenizer)


def assert_400(response, param: str | None, message: str | None = None) -> str:
    assert response.status == 400, response.body
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["param"] == param, body
    if message is not None:
        assert body["error"]["message"] == message, body
    return body["error"]["message"]


@pytest.mark.parametrize(("path", "field", "value"), [
    (CHAT, "functions", [TOOL["function"]]),
    (CHAT, "modalities", ["text", "audio"]),
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    (CHAT, "prediction", {"type": "content", "content": "x"}),
    (CHAT, "web_search_options", {}),
    (CHAT, "store", True),
    (CHAT, "service_tier", "flex"),
    (CHAT, "reasoning_effort", "high"),
    (CHAT, "documents", [{"title": "a", "text": "b"}]),
    (CHAT, "best_of", 3),
    (RESPONSES, "use_beam_search", True),
    (CHAT, "guided_decoding_backend", "outlines"),
    (CHAT, "structural_tag", {"type": "structural_tag"}),
    (CHAT, "logits_processors", ["my.Processor"]),
    (CHAT, "priority", 1),
    (CHAT, "priority", True),  # true is no priority 0
    (CHAT, "cache_salt", "secret"),
    (CHAT, "request_id", "mine"),
    (COMPLETIONS, "suffix", "and so on"),
    (COMPLETIONS, "best_of", 2),
    (COMPLETIONS, "add_special_tokens", False),
    (COMPLETIONS, "prompt_embeds", "AAAA"),
    (CHAT, "mm_processor_kwargs", {"num_crops": 4}),
    ("/tokenize", "mm_processor_kwargs", {"num_crops": 4}),
    (RESPONSES, "prompt_logprobs", 1),
    (RESPONSES, "return_token_ids", True),
    (RESPONSES, "allowed_token_ids", [1, 2]),
    (RESPONSES, "include", ["message.output_text.logprobs"]),
    (RESPONSES, "top_logprobs", 5),
    (RESPONSES, "reasoning", {"effort": "high"}),
    (RESPONSES, "truncation", "auto"),
    (RESPONSES, "background", True),
    (RESPONSES, "conversation", "conv_1"),
    (RESPONSES, "prompt", {"id": "pmpt_1"}),
    (RESPONSES, "context_management", [{"type": "compaction"}]),
    (RESPONSES, "n", 2),
    (RESPONSES, "max_tokens", 5),
    (RESPONSES, "response_format", {"type": "json_object"}),
    (RESPONSES, "service_tier", "flex"),
])
def test_a_field_tokmodel_does_not_implement_is_a_400_naming_it(server, path, field, value):
    base = {CHAT: CHAT_BODY, COMPLETIONS: COMPLETION_BODY, RESPONSES: RESPONSE_BODY,
            "/tokenize": {"messages": MESSAGES}}[path]
    assert_400(server.post(path, base | {field: value}), field, f"{field} is not supported")


def test_default_and_no_op_values_of_unimplemented_fields_are_accepted(server):
    no_ops = {"response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "parallel_tool_calls": True,
              "store": False, "modalities": ["text"], "service_tier": "auto", "metadata": {"team": "a"},
              "user": "u1", "safety_identifier": "s1", "prompt_cache_key": "k1", "n": 2, "best_of": 2,
              "echo": False, "add_generation_prompt": True, "use_beam_search": False, "length_penalty": 1.0,
              "priority": 0, "chat_template_kwargs": {}, "guided_json": None, "reasoning_effort": "none"}
    response = server.post(CHAT, CHAT_BODY | no_ops)
    assert response.status == 200, response.body
    validate(response.json(), "CreateChatCompletionResponse")
    completion = server.post(COMPLETIONS, COMPLETION_BODY | {"suffix": "", "best_of": 1, "echo": False,
                                                             "add_special_tokens": True, "response_format": None})
    assert completion.status == 200, completion.body


def test_default_and_no_op_values_of_unimplemented_response_fields_are_accepted(server):
    no_ops = {"tools": [], "tool_choice": "auto", "parallel_tool_calls": False, "include": [], "top_logprobs": 0,
              "truncation": "disabled", "reasoning": {}, "background": False, "store": False, "n": 1,
              "metadata": {"team": "a"}, "user": "u1", "service_tier": "auto", "max_tool_calls": 3,
              "prompt_cache_key": "k1", "safety_identifier": "s1",
              "text": {"format": {"type": "text"}, "verbosity": "medium"}}
    response = server.post(RESPONSES, RESPONSE_BODY | no_ops)
    assert response.status == 200, response.body
    assert response.json()["metadata"] == {"team": "a"} and response.json()["parallel_tool_calls"] is False


@pytest.mark.parametrize(("value", "message"), [
    (None, "input must be a string or a non-empty array of input items"),
    ([], "input must be a string or a non-empty array of input items"),
    (["Hello"], "input[0] must be an object"),
    ([{"role": "tool", "content": "x"}], "input[0].role must be one of user, system, developer, assistant"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}],
     "input[0].content: only input_text and output_text parts are supported"),
    ([{"type": "reasoning", "id": "rs_1", "summary": []}], "input[0]: reasoning items are not supported"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id must be a non-empty string"),
    ([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{city: Paris}"}],
     "input[0].arguments must be a string of JSON text"),
    ([{"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_image", "image_url": "x"}]}],
     "input[0].output: only input_text and output_text parts are supported"),
])
def test_a_response_input_tokmodel_cannot_read_is_a_400_on_input(server, value, message):
    assert_400(server.post(RESPONSES, RESPONSE_BODY | {"input": value}), "input", message)


@pytest.mark.parametrize(("text", "param"), [
    ({"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}},
     "text.format"),
    ({"format": {"type": "xml"}}, "text.format"),
    ({"verbosity": "high"}, "text.verbosity"),
])
def test_a_text_option_tokmodel_cannot_honour_is_a_400_naming_it(server, text, param):
    assert_400(server.post(RESPONSES, RESPONSE_BODY | {"text": text}), param)


def test_the_openai_client_sees_auto_tool_choice_refused_without_its_flag_and_text_format_accepted(client):
    """As in vLLM: without --enable-auto-tool-choice nothing would read the model's calls."""
    kwargs = {"model": client.models.list().data[0].id, "messages": MESSAGES, "max_tokens": 2}
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(tools=[TOOL], **kwargs)
    assert tools.value.param == "tool_choice" and "--enable-auto-tool-choice" in tools.value.message
    completion = client.chat.completions.create(response_format={"type": "text"}, **kwargs)
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_an_unknown_field_is_ignored_and_logged_once(server):
    name = f"x_unknown_{uuid.uuid4().hex}"
    for _ in range(2):
        assert server.post(CHAT, CHAT_BODY | {name: 1}).status == 200
    assert server.post("/detokenize", {"tokens": [1], name: 1}).status == 200
    lines = [line for line in server.log_path.read_text().splitlines() if name in line]
    assert len(lines) == 1, lines


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_nan_and_infinity_in_the_body_are_a_400(server, literal):
    body = b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": ' + literal + b"}"
    assert literal.lstrip(b"-").decode() in assert_400(server.post(CHAT, body), None)


@pytest.mark.parametrize("depth", [65, 100_000])
def test_a_body_nested_too_deeply_is_a_400(server, depth):
    body = b'{"messages": [{"role": "user", "content": "Hi"}], "extra": ' + b"[" * depth + b"]" * depth + b"}"
    message = assert_400(server.post(CHAT, body), None)
    assert message.startswith("request body is nested too deeply")


def test_a_body_nested_within_the_limit_is_served(server):
    nested = json.loads("[" * 60 + "]" * 60)
    assert server.post(CHAT, CHAT_BODY | {"x_nested": nested}).status == 200


def test_a_number_with_thousands_of_digits_is_a_400_without_python_internals(server):
    message = assert_400(server.post(CHAT, b'{"messages": [], "seed": ' + b"9" * 5000 + b"}"), None)
    assert "digits" in message and "sys." not in message


@pytest.mark.parametrize(("field", "value", "message"), [
    ("top_k", 1e20, "top_k must be an integer, got 1e+20"),
    ("top_k", 10**30, "top_k must be -1, 0 (off) or in [1, {vocab}], got 1000000000000000000000000000000"),
    ("top_k", "{vocab}+1", "top_k must be -1, 0 (off) or in [1, {vocab}], got {vocab}+1"),
    ("top_k", -2, "top_k must be an integer >= -1, got -2"),
    ("seed", 2**64, "seed must be an integer in [-9223372036854775808, 9223372036854775807], got 18446744073709551616"),
    ("seed", -(2**63) - 1, None),
    ("logit_bias", {"99999": 1}, "logit_bias token id 99999 is out of range [0, {vocab})"),
    ("logit_bias", {"5": "high"}, "logit_bias values must be finite numbers, got 'high'"),
    ("logit_bias", {"x": 1}, "logit_bias keys must be token ids, got 'x'"),
    ("stop_token_ids", [2, 99999], "stop_token_ids token id 99999 is out of range [0, {vocab})"),
    ("stop_token_ids", [-1], "stop_token_ids token id -1 is out of range [0, {vocab})"),
    ("stop_token_ids", [2, "x"], "stop_token_ids must be a list of integer token ids, got 'x'"),
    ("allowed_token_ids", [5, 99999], "allowed_token_ids token id 99999 is out of range [0, {vocab})"),
    ("allowed_token_ids", [], "allowed_token_ids must not be empty"),
    ("prompt_logprobs", -2, "prompt_logprobs must be an integer >= -1, got -2"),
    ("truncate_prompt_tokens", 0, "truncate_prompt_tokens must be -1 or an integer >= 1, got 0"),
    ("repetition_penalty", 0, "repetition_penalty must be a finite number > 0, got 0"),
    ("repetition_penalty", 1e39, "repetition_penalty must be a finite number > 0, got 1e+39"),
    ("min_p", 1.5, "min_p must be a number in [0, 1], got 1.5"),
])
def test_a_number_out_of_bounds_is_a_400_naming_the_field_and_value(server, vocab_size, field, value, message):
    if value == "{vocab}+1":
        value, message = vocab_size + 1, message.replace("{vocab}+1", str(vocab_size + 1))
    error = assert_400(server.post(CHAT, CHAT_BODY | {field: value}), field)
    if message is not None:
        assert error == message.replace("{vocab}", str(vocab_size))


def test_prompt_logprobs_with_stream_is_a_400_naming_it(server):
    body = CHAT_BODY | {"prompt_logprobs": 0, "stream": True}
    assert_400(server.post(CHAT, body), "prompt_logprobs", "prompt_logprobs are not available when stream is true")


@pytest.mark.parametrize(("body", "param"), [
    ({"chat_template": "{{ messages[0]['content'] }}"}, "chat_template"),
    ({"chat_template_kwargs": {"chat_template": "{{ messages[0]['content'] }}"}}, "chat_template_kwargs"),
])
def test_a_request_template_is_refused_unless_the_server_trusts_them(server, body, param):
    for path in (CHAT, "/tokenize"):
        message = assert_400(server.post(path, CHAT_BODY | body), param)
        assert "--trust-request-chat-template" in message


def test_tokenizer_info_needs_its_flag_and_load_is_zero_without_tracking(server):
    assert server.request("GET", "/tokenizer_info").status == 404
    assert server.request("GET", "/load").json() == {"server_load": 0}


def test_a_prompt_token_id_outside_the_vocabulary_is_named(server, vocab_size):
    response = server.post(COMPLETIONS, COMPLETION_BODY | {"prompt": [1, 2, 99999]})
    assert_400(response, "prompt", f"prompt token id 99999 is out of range [0, {vocab_size})")


def test_top_logprobs_out_of_range_is_named_top_logprobs(server):
    body = CHAT_BODY | {"logprobs": True, "top_logprobs": 21}
    assert_400(server.post(CHAT, body), "top_logprobs", "top_logprobs must be an integer in [0, 20], got 21")


def test_the_extreme_seeds_still_sample(server):
    for seed in (2**63 - 1, -(2**63)):
        response = server.post(CHAT, CHAT_BODY | {"seed": seed, "n": 2, "temperature": 1.0})
        assert response.status == 200, response.body


def test_a_huge_logit_bias_acts_as_100_and_forces_its_token(server):
    forced = server.post("/tokenize", {"prompt": " Paris", "add_special_tokens": False}).json()["tokens"][0]
    texts = []
    for bias in (1e6, 100):
        body = COMPLETION_BODY | {"temperature": 0, "max_tokens": 3, "logit_bias": {str(forced): bias}}
        response = server.post(COMPLETIONS, body)
        assert response.status == 200, response.body
        texts.append(response.json()["choices"][0]["text"])
    assert texts[0] == texts[1] == server.post("/detokenize", {"tokens": [forced] * 3}).json()["prompt"]


def test_hostile_requests_leave_the_streams_in_flight_intact(server):
    max_tokens = 16
    stream_body = {"messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True}}
    streams = [server.stream(CHAT, stream_body) for _ in range(2)]
    firsts = [next(events) for events in streams]
    hostile = [
        CHAT_BODY | {"top_k": 10**30}, CHAT_BODY | {"seed": 2**64}, CHAT_BODY | {"logit_bias": {"99999": 5}},
        CHAT_BODY | {"stop_token_ids": [-1]}, CHAT_BODY | {"tools": [TOOL]}, CHAT_BODY | {"top_k": 1e20},
        b'{"messages": [], "temperature": NaN}', b"[" * 100_000 + b"]" * 100_000, b'{"seed": ' + b"9" * 5000 + b"}",
    ]
    statuses = [server.post(CHAT, body).status for body in hostile]
    for first, events in zip(firsts, streams):
        rest = list(events)
        assert rest[-1] == "[DONE]"
        chunks = [first, *rest[:-1]]
        assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == ["length"]
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens
    assert statuses == [400] * len(hostile)
