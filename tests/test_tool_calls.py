"""Tool calling through the server on the default model: tool_choice "required" and a named function give calls
of the listed tools whose arguments validate (the grammar sees to it, even for a 135M model), streamed as OpenAI
streams them; "auto" calls are read by the hermes parser; tool history reaches the chat template; the openai
client's parse helpers and pydantic-ai get validated objects; malformed requests are 400s naming their field."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from server_fixtures import Server, leaves_server_idle, openai_client, running_server, validate  # noqa: F401 (autouse fixture)

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone", "parameters": {
    "type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLING = {"max_tokens": 400, "temperature": 1.0, "seed": 11}
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def server() -> Server:
    with running_server("--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai_client(server)


def assert_valid_calls(calls: list[dict], names: set[str] = set(SCHEMAS)) -> None:
    assert calls, "at least one call"
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def chat(server: Server, **body) -> dict:
    response = server.post(CHAT, {"messages": ASK, "tools": TOOLS} | SAMPLING | body)
    assert response.status == 200, response.body
    validate(response.json(), "CreateChatCompletionResponse")
    return response.json()


def streamed_calls(server: Server, **body) -> tuple[list[dict], str]:
    """The calls of a streamed choice, put together from their deltas, and its finish_reason."""
    calls: dict[int, dict] = {}
    finish_reason = None
    for event in server.stream(CHAT, {"messages": ASK, "tools": TOOLS, "stream": True} | SAMPLING | body):
        if event == "[DONE]":
            break
        validate(event, "CreateChatCompletionStreamResponse")
        [choice] = event["choices"]
        finish_reason = choice["finish_reason"] or finish_reason
        for delta in choice["delta"].get("tool_calls", []):
            if delta["index"] not in calls:  # the first piece: index, id, type and the whole name
                assert delta["index"] == len(calls) and delta["id"] and delta["function"]["name"]
                calls[delta["index"]] = {"id": delta["id"], "type": delta["type"], "function": dict(delta["function"])}
            else:  # then only fragments of the arguments
                assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
                calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
    return list(calls.values()), finish_reason


# With parallel calls allowed nothing bounds the array but the model: sampled at temperature 1, the 135M model
# sometimes calls get_time again and again until max_tokens. Greedy, it makes three calls and closes the array.
def test_required_gives_calls_of_listed_tools_with_valid_arguments(server):
    for choice in chat(server, tool_choice="required", temperature=0)["choices"]:
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert_valid_calls(choice["message"]["tool_calls"])


def test_a_named_function_is_the_one_call(server):
    for choice in chat(server, tool_choice=NAMED_TIME, n=2)["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert len(choice["message"]["tool_calls"]) == 1
        assert_valid_calls(choice["message"]["tool_calls"], names={"get_time"})


def test_without_parallel_tool_calls_required_makes_one_call(server):
    for choice in chat(server, tool_choice="required", parallel_tool_calls=False, n=3)["choices"]:
        assert len(choice["message"]["tool_calls"]) == 1
        assert_valid_calls(choice["message"]["tool_calls"])


@pytest.mark.parametrize("tool_choice", ["required", NAMED_TIME], ids=["required", "named"])
def test_streamed_tool_call_deltas_reassemble_to_valid_calls(server, tool_choice):
    calls, finish_reason = streamed_calls(server, tool_choice=tool_choice, temperature=0)
    assert finish_reason == "tool_calls"
    assert_valid_calls(calls, names={"get_time"} if tool_choice == NAMED_TIME else set(SCHEMAS))


CANNED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_auto_calls_are_read_by_the_hermes_parser(server, stream):
    """The model's text is forced to a Hermes call, as a model trained on the format would write it."""
    body = {"tool_choice": "auto", "guided_choice": [f"Checking.\n{CANNED_CALL}"]}
    if stream:
        calls, finish_reason = streamed_calls(server, **body)
    else:
        [choice] = chat(server, **body)["choices"]
        assert choice["message"]["content"] == "Checking."
        calls, finish_reason = choice["message"]["tool_calls"], choice["finish_reason"]
    assert finish_reason == "tool_calls" and [call["function"]["name"] for call in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


def test_auto_without_a_call_is_text(server):
    [choice] = chat(server, guided_choice=["It is sunny in Paris."])["choices"]  # tool_choice: auto by default
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "It is sunny in Paris."
    assert "tool_calls" not in choice["message"]


def test_tool_history_reaches_the_chat_template(server):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    tokens = server.post("/tokenize", {"messages": history, "tools": TOOLS}).json()["tokens"]
    prompt = server.post("/detokenize", {"tokens": tokens}).json()["prompt"]
    assert json.dumps(TOOLS[0]) in prompt  # the default model's template has no tools: the Hermes format
    assert CANNED_CALL in prompt and "<tool_response>\n18 degrees and sunny\n</tool_response>" in prompt
    assert chat(server, messages=history, tool_choice="none", max_tokens=5)["choices"][0]["finish_reason"]


class GetWeather(BaseModel):
    """The weather in a city."""
    city: str = Field(max_length=20)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


def test_the_openai_clients_parse_validates_the_arguments(client):
    completion = client.chat.completions.parse(model=MODEL, messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
                                               tool_choice="required", **SAMPLING)
    calls = completion.choices[0].message.tool_calls
    assert calls and all(isinstance(call.function.parsed_arguments, GetWeather) for call in calls)


class Capital(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


def test_pydantic_ai_gets_its_output_through_a_tool_call(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=f"{server.base_url}/v1", api_key="unused")
    agent = Agent(OpenAIChatModel(MODEL, provider=provider), output_type=Capital)
    result = agent.run_sync("What is the capital of France?", model_settings={"max_tokens": 100, "temperature": 0.5})
    assert isinstance(result.output, Capital)


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_gets_a_valid_model_on_its_first_try(client, mode):
    """instructor's two modes for an OpenAI endpoint: a named tool call, and response_format json_schema. One
    attempt: instructor would otherwise retry with the validation error, hiding an invalid first answer."""
    import instructor

    structured = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    capital = structured.chat.completions.create(
        model=MODEL, response_model=Capital, max_retries=1, max_tokens=100, temperature=0.5, seed=3,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert isinstance(capital, Capital)


@pytest.mark.parametrize(("change", "param", "says"), [
    ({"tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice", "'get_news'"),
    ({"tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "distinct names"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools", "only function tools"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "objectx"}}}],
      "tool_choice": "required"}, "tools", "tools: invalid JSON schema"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", "constrain"),
    ({"messages": [*ASK, {"role": "tool", "content": "18 degrees"}]}, "messages", "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": {"id": "call_1"}}]}, "messages", "tool_calls must be"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{city: Paris}"}}]}]},
     "messages", "messages[1].tool_calls[0].function.arguments must be JSON"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]},
     "messages", "messages[1].tool_calls[0].function.arguments"),
])
def test_a_malformed_tool_request_is_a_400_naming_its_field(server, change, param, says):
    response = server.post(CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 5} | change)
    assert response.status == 400, response.body
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
