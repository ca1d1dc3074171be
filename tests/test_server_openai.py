"""The server through the official openai client: every response and chunk checked against OpenAI's schemas;
and examples/chat_client.py, which a newcomer runs against it."""
from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest

from server_fixtures import (REPO, Server, free_port, leaves_server_idle, openai_client,  # noqa: F401 (autouse)
                             running_server, validate)

API_KEY = "test-key"
MODEL = "tokmodel-test"
MESSAGES = [{"role": "user", "content": "List three colors."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server() -> Server:
    with running_server("--served-model-name", MODEL, "--max-model-len", "1024", api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai_client(server)


def chat(client: openai.OpenAI, **kwargs):
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8} | kwargs
    completion = client.chat.completions.create(**kwargs)
    validate(completion.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    return completion


def stream_chat(client: openai.OpenAI, **kwargs) -> list:
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True} | kwargs
    chunks = list(client.chat.completions.create(**kwargs))
    for chunk in chunks:
        validate(chunk.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse")
    return chunks


def streamed_text(chunks: list, index: int = 0) -> str:
    return "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices if c.index == index)


def validate_completion_chunk(chunk: dict) -> None:
    """The legacy API streams finish_reason null until a choice ends (as OpenAI does), which its schema, written
    for the full response, does not allow: validate the rest of the chunk."""
    for choice in chunk["choices"]:
        assert choice["finish_reason"] in (None, "stop", "length")
        choice["finish_reason"] = choice["finish_reason"] or "length"
    validate(chunk, "CreateCompletionResponse")


def test_chat_completion_has_openai_shape_and_usage_matches_tokenize(client, server):
    completion = chat(client, **GREEDY)
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == MODEL
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    prompt_tokens = server.post("/tokenize", {"model": MODEL, "messages": MESSAGES}).json()["count"]
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt_tokens, 8, prompt_tokens + 8)
    assert usage.prompt_tokens_details.cached_tokens is not None


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_token_limit_ends_with_length_after_exactly_that_many_tokens(client, limit):
    completion = chat(client, **GREEDY, **{"max_tokens": None, limit: 5})
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"


def test_stream_concatenates_to_the_non_streamed_text_then_usage_then_done(client):
    expected = chat(client, **GREEDY).choices[0].message.content
    chunks = stream_chat(client, **GREEDY, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.delta.role is None for chunk in chunks[1:] for c in chunk.choices)
    assert streamed_text(chunks) == expected
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finishes == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 8
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_n_choices_each_indexed_and_streamed_interleaved_with_own_role_and_finish(client):
    completion = chat(client, n=3, temperature=1.0, max_tokens=4, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in completion.choices) == [0, 1, 2]
    assert completion.usage.completion_tokens == 3 * 4
    chunks = stream_chat(client, n=2, temperature=1.0, max_tokens=4, extra_body={"ignore_eos": True})
    assert all(len(chunk.choices) == 1 for chunk in chunks)
    for index in (0, 1):
        mine = [chunk.choices[0] for chunk in chunks if chunk.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]


def test_stop_string_cuts_the_text_before_it_and_never_leaks_into_the_stream(client):
    base = chat(client, **GREEDY, max_tokens=16).choices[0].message.content
    stop = base[len(base) // 2:len(base) // 2 + 3]
    expected = base[:base.index(stop)]
    completion = chat(client, **GREEDY, max_tokens=16, stop=[stop])
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    chunks = stream_chat(client, **GREEDY, max_tokens=16, stop=stop)
    assert streamed_text(chunks) == expected
    assert not any(stop in (c.delta.content or "") for chunk in chunks for c in chunk.choices)


def test_logprobs_give_each_token_with_its_top_alternatives_sorted(client):
    completion = chat(client, **GREEDY, max_tokens=4, logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens == 4
    assert "".join(entry.token for entry in content) == completion.choices[0].message.content
    for entry in content:
        top = [alt.logprob for alt in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and top[0] <= 0
        # Greedy: the sampled token is the most likely one.
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, pytest.approx(top[0]))
        assert bytes(entry.bytes).decode() == entry.token
    chunks = stream_chat(client, **GREEDY, max_tokens=4, logprobs=True, top_logprobs=1)
    assert sum(len(c.logprobs.content) for chunk in chunks for c in chunk.choices if c.logprobs) == 4


def test_same_seed_samples_the_same_text(client):
    sampled = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "max_tokens": 8}
    first, second = (chat(client, **sampled).choices[0].message.content for _ in range(2))
    assert first == second


def test_repeated_long_prompt_reports_cached_prompt_tokens(client):
    system = {"role": "system", "content": " ".join(f"Rule {i}: answer briefly and politely." for i in range(30))}
    messages = [system, {"role": "user", "content": "Hi"}]
    first = chat(client, messages=messages, max_tokens=2).usage
    second = chat(client, messages=messages, max_tokens=2).usage
    assert first.prompt_tokens > 64
    assert 0 < second.prompt_tokens_details.cached_tokens < second.prompt_tokens


def test_completions_take_several_prompts_token_ids_echo_and_logprobs(client):
    completion = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], n=2, max_tokens=3,
                                           echo=True, temperature=0, extra_body={"ignore_eos": True})
    validate(completion.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert sorted(c.index for c in completion.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in completion.choices}
    assert texts[0].startswith("The sky is") and texts[2].startswith("Water is")
    assert completion.usage.completion_tokens == 12
    scored = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, logprobs=2, temperature=0)
    validate(scored.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    logprobs = scored.choices[0].logprobs
    assert "".join(logprobs.tokens) == scored.choices[0].text
    assert logprobs.text_offset[0] == 0 and all(len(top) == 2 for top in logprobs.top_logprobs)


def test_completions_accept_token_ids_and_stream_with_usage(client, server):
    tokens = server.post("/tokenize", {"model": MODEL, "prompt": "The sky is"}).json()["tokens"]
    chunks = list(client.completions.create(model=MODEL, prompt=tokens, max_tokens=4, stream=True, temperature=0,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    for chunk in chunks:
        validate_completion_chunk(chunk.model_dump(mode="json", exclude_unset=True))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(tokens)
    text = "".join(c.text for chunk in chunks for c in chunk.choices)
    same = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert text == same.choices[0].text


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    validate(models.model_dump(mode="json", exclude_unset=True), "ListModelsResponse")


def test_a_model_is_retrieved_by_its_id_and_another_id_is_a_404(client):
    model = client.models.retrieve(MODEL)
    assert model == client.models.list().data[0]
    validate(model.model_dump(mode="json", exclude_unset=True), "Model")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("org/other-model")
    assert missing.value.code == "model_not_found" and "org/other-model" in missing.value.message


def chat_client(base_url: str, *args: str, api_key: str | None = None) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "TOKMODEL_API_KEY"}
    if api_key:
        env["TOKMODEL_API_KEY"] = api_key
    return subprocess.run([sys.executable, str(REPO / "examples" / "chat_client.py"), "--base-url", f"{base_url}/v1",
                           "--max-tokens", "4", *args, "Hello"], capture_output=True, text=True, timeout=120, env=env)


def test_chat_client_example_chats_with_the_key_from_the_environment(server):
    result = chat_client(server.base_url, api_key=API_KEY)
    assert result.returncode == 0, result.stderr
    assert "4 generated]" in result.stdout


def test_chat_client_example_says_the_key_is_wrong_in_one_line(server):
    result = chat_client(server.base_url, "--api-key", "wrong-key")
    assert result.returncode == 1
    assert result.stderr.startswith("chat_client: the server at") and "refused the API key" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_chat_client_example_says_no_server_answers_on_a_closed_port():
    result = chat_client(f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.startswith("chat_client: no server answers at") and len(result.stderr.splitlines()) == 1
