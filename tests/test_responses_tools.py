"""Function tools in the Responses API on the default model, through the official openai client: tool_choice
"required" and a named function give function_call items of the listed tools whose arguments validate (the
grammar sees to it, even for a 135M model), streamed with OpenAI's events; every response and event parses
strictly with the client's own models; calls and their outputs stay in a stored conversation; the OpenAI Agents
SDK runs a function tool; malformed tools are 400s naming their field."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from openai.types.responses import Response

from server_fixtures import Server, leaves_server_idle, openai_client, running_server  # noqa: F401 (autouse fixture)
from test_server_responses import RESPONSES, STREAM_EVENT, run_agent, strict_response, undeclared_fields

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "strict": True,
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "maxLength": 20},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}
TIME = {"type": "function", "name": "get_time", "description": "The time in a time zone", "parameters": {
    "type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"]}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["name"]: tool["parameters"] for tool in TOOLS}
ASK = "What is the weather in Paris?"
SAMPLING = {"max_output_tokens": 150, "temperature": 1.0, "extra_body": {"seed": 11}}
NAMED_TIME = {"type": "function", "name": "get_time"}


@pytest.fixture(scope="module")
def server() -> Server:
    with running_server("--max-model-len", "2048") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai_client(server)


def create(client: openai.OpenAI, **body) -> Response:
    """client.responses.create, its response checked strictly against the client's model."""
    response = client.responses.create(model=MODEL, **({"input": ASK, "tools": TOOLS} | SAMPLING | body))
    strict_response(response.to_dict(mode="json"))
    return response


def create_stream(client: openai.OpenAI, **body) -> list[dict]:
    """The events of client.responses.create(stream=True), each checked strictly against the client's models."""
    stream = client.responses.create(model=MODEL, **({"input": ASK, "tools": TOOLS, "stream": True} | SAMPLING | body))
    events = [event.to_dict(mode="json") for event in stream]
    for event in events:
        parsed = STREAM_EVENT.validate_python(event)
        assert not undeclared_fields(parsed), undeclared_fields(parsed)
    return events


def calls_of(response: Response) -> list[dict]:
    return [item.to_dict(mode="json") for item in response.output if item.type == "function_call"]


def assert_valid_calls(calls: list[dict], names: set[str] = set(SCHEMAS)) -> None:
    assert calls, "at least one call"
    for call in calls:
        assert call["id"].startswith("fc_") and call["call_id"].startswith("call_") and call["status"] == "completed"
        assert call["name"] in names
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_required_gives_function_call_items_of_listed_tools_with_valid_arguments(client):
    response = create(client, tool_choice="required")
    assert response.status == "completed" and response.tool_choice == "required"
    assert [item.type for item in response.output] == ["function_call"] * len(response.output)
    assert_valid_calls(calls_of(response))


def test_a_named_function_is_the_one_call(client):
    response = create(client, tool_choice=NAMED_TIME)
    [call] = calls_of(response)
    assert_valid_calls([call], names={"get_time"})
    assert response.tool_choice.name == "get_time"


def test_without_parallel_tool_calls_required_makes_one_call(client):
    assert len(calls_of(create(client, tool_choice="required", parallel_tool_calls=False))) == 1


@pytest.mark.parametrize("tool_choice", ["required", NAMED_TIME], ids=["required", "named"])
def test_streamed_function_calls_are_openai_events_that_add_up_to_the_final_items(client, tool_choice):
    events = create_stream(client, tool_choice=tool_choice)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert [event["type"] for event in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "response.completed"
    final = events[-1]["response"]
    calls = [item for item in final["output"] if item["type"] == "function_call"]
    assert_valid_calls(calls, names={"get_time"} if tool_choice == NAMED_TIME else set(SCHEMAS))
    for index, call in enumerate(calls):
        about = [event for event in events if event.get("output_index") == index]
        kinds = [event["type"] for event in about]
        deltas = kinds.count("response.function_call_arguments.delta")
        assert kinds == ["response.output_item.added", *["response.function_call_arguments.delta"] * deltas,
                         "response.function_call_arguments.done", "response.output_item.done"]
        added, done_arguments, done_item = about[0]["item"], about[-2]["arguments"], about[-1]["item"]
        assert about[-2]["name"] == call["name"]
        assert (added["status"], added["arguments"], added["name"]) == ("in_progress", "", call["name"])
        streamed = "".join(event["delta"] for event in about if event["type"].endswith("arguments.delta"))
        assert streamed == done_arguments == call["arguments"] and done_item == call
        assert {event["item_id"] for event in about[1:-1]} == {call["id"]}


def weather(city: str, unit: str) -> str:
    return f"18 degrees {unit} and sunny in {city}"


def test_calls_and_their_outputs_stay_in_the_stored_conversation(server, client):
    first = create(client, tool_choice={"type": "function", "name": "get_weather"})
    [call] = calls_of(first)
    output = weather(**json.loads(call["arguments"]))
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": output}
    second = create(client, previous_response_id=first.id, input=[result], tool_choice="none", max_output_tokens=30)
    assert second.status in ("completed", "incomplete") and second.output_text
    assert [item.type for item in second.output] == ["message"]
    # The prompt as chat completions render it: the call as an assistant's tool_calls, its output a tool message.
    tool_call = {"id": call["call_id"], "type": "function",
                 "function": {"name": call["name"], "arguments": call["arguments"]}}
    messages = [{"role": "user", "content": ASK}, {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                {"role": "tool", "tool_call_id": call["call_id"], "content": output}]
    chat_tools = [{"type": "function", "function": {key: tool[key] for key in ("name", "description", "parameters")}}
                  for tool in TOOLS]
    tokens = server.post("/tokenize", {"messages": messages, "tools": chat_tools}).json()["count"]
    assert second.usage.input_tokens == tokens
    # A client that sends the whole history itself (as the Agents SDK does) gets the same prompt.
    history = [{"role": "user", "content": ASK}, *(item.to_dict(mode="json") for item in first.output), result]
    assert create(client, input=history, tool_choice="none", max_output_tokens=1).usage.input_tokens == tokens


def test_agents_sdk_calls_a_function_tool_through_the_responses_api(server):
    agents = pytest.importorskip("agents")
    called: list[dict] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        called.append({"city": city})
        return f"Sunny in {city}"

    # "required" makes the 135M model call (once, without parallel calls); the run ends with that tool's output.
    settings = agents.ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0)
    agent = agents.Agent(name="weather", instructions="Use the tool.", model=MODEL, tools=[get_weather],
                         model_settings=settings, tool_use_behavior="stop_on_first_tool")
    for streamed in (False, True):
        called.clear()
        result = asyncio.run(run_agent(server, agents, agent, ASK, streamed))
        [call] = called
        assert result.final_output == f"Sunny in {call['city']}"


@pytest.mark.parametrize(("change", "param", "says"), [
    ({"tool_choice": {"type": "function", "name": "get_news"}}, "tool_choice", "'get_news'"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     'or {"type": "function", "name": ...}'),
    ({"tools": [{"type": "function", "function": WEATHER}]}, "tools", "tools[0].name must be a non-empty string"),
    ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools", "distinct names"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": "auto"}, "tool_choice", "--enable-auto-tool-choice"),
    ({}, "tool_choice", "--enable-auto-tool-choice"),  # tool_choice is "auto" when there are tools
    ({"tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "text.format", "constrain"),
])
def test_a_malformed_tool_request_is_a_400_naming_its_field(server, change, param, says):
    response = server.post(RESPONSES, {"model": MODEL, "input": ASK, "tools": TOOLS, "max_output_tokens": 5} | change)
    assert response.status == 400, response.body
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
