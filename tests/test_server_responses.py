"""The Responses API through raw HTTP and the official openai client: every object and streamed event checked
against the client's own pydantic models, with no field they do not declare; token counts against /tokenize of
the chat messages a response stands for; and the OpenAI Agents SDK with its default (Responses) model."""
from __future__ import annotations

import asyncio
import json
from typing import Literal

import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseErrorEvent, ResponseStreamEvent

from engine.sampling_params import SamplingParams
from server.errors import OpenAIError
from server.response_builder import ResponseBuilder, ResponseEventFraming
from server_fixtures import Server, leaves_server_idle, running_server, validate  # noqa: F401 (autouse)
from test_server_openai import API_KEY, MODEL, client, server  # noqa: F401 (fixtures: a server of this module's own)

RESPONSES = "/v1/responses"
GREEDY = {"model": MODEL, "temperature": 0, "ignore_eos": True}  # ignore_eos: exactly max_output_tokens tokens
STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def undeclared_fields(value: object, path: str = "") -> list[str]:
    """Paths of the fields a parsed object holds beyond its model's (the client's models accept any silently)."""
    if isinstance(value, pydantic.BaseModel):
        found = [f"{path}.{name}" for name in value.model_extra or {}]
        return found + [extra for name in type(value).model_fields
                        for extra in undeclared_fields(getattr(value, name), f"{path}.{name}")]
    if isinstance(value, list):
        return [extra for i, item in enumerate(value) for extra in undeclared_fields(item, f"{path}[{i}]")]
    return []


def strict_response(data: dict) -> Response:
    response = Response.model_validate(data)
    assert not undeclared_fields(response), undeclared_fields(response)
    return response


def create(server: Server, **body) -> dict:
    reply = server.post(RESPONSES, body)
    assert reply.status == 200, reply.body
    strict_response(reply.json())
    return reply.json()


def stream(server: Server, **body) -> list[dict]:
    """The raw events of a streamed response, each checked to be named by its type and to parse strictly."""
    conn = server.connection()
    try:
        conn.request("POST", RESPONSES, body=json.dumps(body | {"stream": True}).encode(), headers=server.headers())
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()
        assert reply.getheader("Content-Type") == "text/event-stream"
        lines = reply.read().decode().split("\n\n")
    finally:
        conn.close()
    events = []
    for block in filter(None, lines):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))  # no data: [DONE] in the Responses API
        assert name == f"event: {event['type']}"
        parsed = STREAM_EVENT.validate_python(event)
        assert not undeclared_fields(parsed), undeclared_fields(parsed)
        events.append(event)
    return events


def prompt_tokens(server: Server, messages: list[dict]) -> int:
    return server.post("/tokenize", {"model": MODEL, "messages": messages}).json()["count"]


def output_text(response: dict) -> str:
    return "".join(part["text"] for item in response["output"] for part in item["content"])


def test_response_to_a_string_input_has_openai_shape_and_usage(server):
    response = create(server, input="List three colors.", max_output_tokens=6, **GREEDY)
    assert response["id"].startswith("resp_") and response["object"] == "response" and response["model"] == MODEL
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    [message] = response["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "incomplete"
    assert message["id"].startswith("msg_") and output_text(response)
    usage = response["usage"]
    expected = prompt_tokens(server, [{"role": "user", "content": "List three colors."}])
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (expected, 6, expected + 6)
    assert (response["temperature"], response["max_output_tokens"], response["tools"]) == (0, 6, [])


def test_instructions_and_message_items_are_the_chat_messages_they_name(server):
    items = [{"role": "developer", "content": "Answer briefly."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi. "},
                                                             {"type": "input_text", "text": "Who are you?"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "A model.", "annotations": []}]},
             {"role": "user", "content": "And?"}]
    response = create(server, input=items, instructions="Be kind.", max_output_tokens=1, **GREEDY)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Hi. Who are you?"}, {"role": "assistant", "content": "A model."},
                {"role": "user", "content": "And?"}]
    assert response["usage"]["input_tokens"] == prompt_tokens(server, messages)
    assert response["instructions"] == "Be kind."


def test_stream_is_openai_event_sequence_with_the_non_streamed_text(server):
    body = {"input": "List three colors.", "max_output_tokens": 6, **GREEDY}
    events = stream(server, **body)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1 and kinds == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * deltas, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.incomplete"]
    created, last = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert created["id"] == last["id"] and last["usage"]["output_tokens"] == 6
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == events[-4]["text"] == output_text(last) == output_text(create(server, **body))
    assert {e["item_id"] for e in events if "item_id" in e} == {last["output"][0]["id"]}


def test_the_openai_client_streams_to_a_completed_response(client):
    with client.responses.stream(model=MODEL, input="Say hello.", temperature=0) as events:
        deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
        response = events.get_final_response()
    assert response.status == "completed" and response.completed_at is not None
    assert response.output_text == "".join(deltas) and response.usage.output_tokens >= 1


def test_stored_response_is_retrieved_and_continued_without_its_instructions(server, client):
    first = create(server, input="My name is Ada.", instructions="Answer in French.", max_output_tokens=3, **GREEDY)
    retrieved = client.responses.with_raw_response.retrieve(first["id"]).http_response.json()
    assert retrieved == first
    second = create(server, input="What is my name?", previous_response_id=first["id"], max_output_tokens=2, **GREEDY)
    third = create(server, input="Spell it.", instructions="Be brief.", previous_response_id=second["id"],
                   max_output_tokens=1, **GREEDY)
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": output_text(first)},
               {"role": "user", "content": "What is my name?"}]
    assert second["usage"]["input_tokens"] == prompt_tokens(server, history)
    assert second["previous_response_id"] == first["id"]
    history = [{"role": "system", "content": "Be brief."}, *history,
               {"role": "assistant", "content": output_text(second)}, {"role": "user", "content": "Spell it."}]
    assert third["usage"]["input_tokens"] == prompt_tokens(server, history)


def test_a_streamed_response_is_stored_before_its_last_event(server):
    events = stream(server, input="Hello", max_output_tokens=2, **GREEDY)
    assert server.request("GET", f"{RESPONSES}/{events[-1]['response']['id']}").json() == events[-1]["response"]


def test_a_response_with_store_false_can_be_neither_retrieved_nor_continued(server, client):
    response = create(server, input="Hello", max_output_tokens=1, store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response["id"])
    reply = server.post(RESPONSES, {"input": "Again", "previous_response_id": response["id"]})
    assert reply.status == 404
    validate(reply.json(), "ErrorResponse")
    assert reply.json()["error"]["param"] == "previous_response_id"


def test_a_deleted_response_can_be_neither_retrieved_nor_continued_nor_deleted_again(server, client):
    response = create(server, input="Hello", max_output_tokens=1, **GREEDY)
    deleted = server.request("DELETE", f"{RESPONSES}/{response['id']}")
    assert deleted.status == 200 and deleted.json() == {"id": response["id"], "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response["id"])
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response["id"])
    assert server.post(RESPONSES, {"input": "Again", "previous_response_id": response["id"]}).status == 404


def test_max_stored_responses_bounds_the_store_oldest_forgotten_first():
    with running_server("--max-stored-responses", "1", "--max-model-len", "256") as small:
        first, second = (create(small, input="Hello", max_output_tokens=1, temperature=0) for _ in range(2))
        assert small.request("GET", f"{RESPONSES}/{first['id']}").status == 404
        assert small.request("GET", f"{RESPONSES}/{second['id']}").json() == second


def test_an_unknown_response_id_is_an_openai_404(server):
    reply = server.request("GET", f"{RESPONSES}/resp_unknown")
    assert reply.status == 404
    validate(reply.json(), "ErrorResponse")
    assert reply.json()["error"]["message"] == "Response with id 'resp_unknown' not found."


class Color(pydantic.BaseModel):
    name: Literal["red", "green", "blue"]
    bright: bool


def test_text_format_json_schema_constrains_the_output_to_the_schema(client):
    response = client.responses.parse(model=MODEL, input="Name a color.", text_format=Color, temperature=0)
    assert isinstance(response.output_parsed, Color)
    assert response.text.format.type == "json_schema" and response.text.format.name == "Color"


def test_text_format_json_object_returns_a_json_object(client):
    response = client.responses.create(model=MODEL, input="Give a JSON object with the key city.", temperature=0,
                                       max_output_tokens=100, text={"format": {"type": "json_object"}})
    assert response.status == "completed" and isinstance(json.loads(response.output_text), dict)


def test_agents_sdk_runs_an_agent_on_the_default_responses_model(server, client):
    agents = pytest.importorskip("agents")
    agent = agents.Agent(name="assistant", instructions="Answer in one short sentence.", model=MODEL,
                         model_settings=agents.ModelSettings(temperature=0))
    result = asyncio.run(run_agent(server, agents, agent, "What is the capital of France?"))
    assert isinstance(result.final_output, str) and result.final_output
    [raw] = result.raw_responses  # one model call, through the Responses API: its response was stored
    assert client.responses.retrieve(raw.response_id).output_text == result.final_output
    streamed = asyncio.run(run_agent(server, agents, agent, "What is the capital of France?", streamed=True))
    assert streamed.final_output == result.final_output


def test_agents_sdk_output_type_is_a_validated_pydantic_object(server):
    agents = pytest.importorskip("agents")
    agent = agents.Agent(name="colors", instructions="Answer in JSON.", model=MODEL, output_type=Color,
                         model_settings=agents.ModelSettings(temperature=0))
    result = asyncio.run(run_agent(server, agents, agent, "Which color is the sky?"))
    assert isinstance(result.final_output, Color)


async def run_agent(server: Server, agents, agent, prompt: str, streamed: bool = False):
    """Runner.run, or Runner.run_streamed read to its end, on a client of the server (set per run: each
    asyncio.run has its own event loop, which an AsyncOpenAI client must not outlive)."""
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY,
                                                        max_retries=0))
    agents.set_tracing_disabled(True)
    if not streamed:
        return await agents.Runner.run(agent, prompt)
    result = agents.Runner.run_streamed(agent, prompt)
    async for _ in result.stream_events():
        pass
    return result


def test_a_prompt_over_the_context_is_a_json_400_even_when_streamed(server):
    reply = server.post(RESPONSES, {"input": "word " * 1100, "stream": True})
    assert reply.status == 400 and reply.headers["Content-Type"].startswith("application/json")
    validate(reply.json(), "ErrorResponse")


def test_a_failure_mid_stream_is_a_numbered_error_event():
    builder = ResponseBuilder(MODEL, {}, SamplingParams(), parser=None)
    builder.opening_events()
    framed = ResponseEventFraming(builder).error(OpenAIError(503, "the request was aborted", code="aborted"))
    name, data = framed.decode().rstrip("\n").split("\n")
    event = STREAM_EVENT.validate_python(json.loads(data.removeprefix("data: ")))
    assert name == "event: error" and isinstance(event, ResponseErrorEvent) and not undeclared_fields(event)
    assert (event.sequence_number, event.code, event.message) == (2, "aborted", "the request was aborted")
