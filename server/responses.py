"""POST /v1/responses, GET and DELETE /v1/responses/{response_id}: OpenAI's Responses API on the chat path (the chat
template, sampling parameters, tool calling, admission and aborts of chat completions), its responses stored in
memory so that `previous_response_id` can continue them."""
from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from functools import partial
from typing import TYPE_CHECKING

from aiohttp import web

from engine.chat_template import ChatTemplateOptions
from engine.outputs import RequestOutput
from server.errors import OpenAIError, bad_request
from server.fields import RESPONSES_REFUSED, check_fields
from server.generation import generate_many
from server.protocol import (CHAT_FIELDS, chat_prompt, check_model, check_types, read_json, require_tokenizer,
                             sampling_params, vocab_size)
from server.response_builder import ResponseBuilder, ResponseEventFraming
from server.response_input import input_messages, instructions_messages, item_messages
from server.response_store import ResponseStore, StoredResponse
from server.state import STATE, ServerState
from server.streaming import stream_events
from server.structured_outputs import text_format
from server.tools import RESPONSES_FORM, ToolCalling, request_tool_calling

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams

# vLLM's sampling parameters beyond OpenAI's, honoured here as on chat completions.
_VLLM_SAMPLING = ("top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
                  "logit_bias", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens")
RESPONSES_FIELDS: dict[str, tuple[type, ...]] = {name: CHAT_FIELDS[name] for name in _VLLM_SAMPLING} | {
    "model": (str,), "input": (str, list), "instructions": (str,), "max_output_tokens": (int,),
    "temperature": CHAT_FIELDS["temperature"], "top_p": CHAT_FIELDS["top_p"], "text": (dict,), "tools": (list,),
    "tool_choice": (str, dict), "parallel_tool_calls": (bool,), "previous_response_id": (str,), "store": (bool,),
    "stream": (bool,), "stream_options": (dict,), "metadata": (dict,), "user": (str,),
}
_TEXT_VERBOSITY = "medium"  # the model writes as it writes: only the default verbosity asks for nothing else


async def create_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    params, tool_calling = _checked_request(body, state)
    previous = _stored(state.responses, body.get("previous_response_id"), "previous_response_id")
    messages = input_messages(body)
    history = previous.conversation if previous else []
    prompt = await chat_prompt(state.llm, instructions_messages(body) + history + messages,
                               tool_calling.template_tools(), "input", ChatTemplateOptions(chat_template=state.chat_template))
    builder = ResponseBuilder(state.llm.model_name, body, params, tool_calling.new_parser())
    outputs = generate_many(state, [prompt], params, builder.id)
    store = state.responses if body.get("store") is not False else None
    finish = partial(_finish, store, builder, messages, previous)
    if body.get("stream"):
        return await stream_events(request, _events(builder, outputs, finish), ResponseEventFraming(builder))
    async with aclosing(outputs):
        async for _, out in outputs:
            builder.add(out)
    finish()
    return web.json_response(builder.response())


async def retrieve_response(request: web.Request) -> web.Response:
    stored = _stored(request.app[STATE].responses, request.match_info["response_id"], "response_id")
    return web.json_response(stored.response)


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    _stored(request.app[STATE].responses, response_id, "response_id")
    request.app[STATE].responses.delete(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


async def _events(builder: ResponseBuilder, outputs: AsyncIterator[tuple[int, RequestOutput]],
                  finish: Callable[[], None]) -> AsyncGenerator[list[dict], None]:
    """A batch of events per engine output; the opening events go out with the first, so that a request the
    engine refuses still gets a JSON error (server/streaming.py)."""
    async with aclosing(outputs):
        async for _, out in outputs:
            opening = [] if builder.started else builder.opening_events()
            yield opening + builder.add(out)
    finish()
    yield builder.closing_events()


def _checked_request(body: dict, state: ServerState) -> tuple[SamplingParams, ToolCalling]:
    """The request's sampling parameters and tools, once every field is known to be honoured and well typed."""
    check_fields(body, RESPONSES_FIELDS, RESPONSES_REFUSED)
    check_types(body, RESPONSES_FIELDS)
    check_model(body, state.llm.model_name)
    text = body.get("text") or {}
    if text.get("verbosity") not in (None, _TEXT_VERBOSITY):
        raise bad_request("text.verbosity is not supported", param="text.verbosity")
    output_format = text_format(text.get("format"))
    tool_calling = request_tool_calling(body, RESPONSES_FORM, state.tool_parser)
    tool_calling.check_sole_constraint("text.format" if output_format is not None else None)
    params = sampling_params(body, body.get("max_output_tokens"), None, vocab_size(state.llm),
                             {"max_tokens": "max_output_tokens"}, tool_calling.structured_outputs or output_format)
    require_tokenizer(state.llm)
    tool_calling.adjust_request(params, state.llm.tokenizer)
    return params, tool_calling


def _finish(store: ResponseStore | None, builder: ResponseBuilder, messages: list[dict],
            previous: StoredResponse | None) -> None:
    """Stores the finished response (unless it asked for `store: false`) before its last event or its body goes
    out, so that a client can retrieve or continue it as soon as it has it."""
    if store is not None:
        response = builder.response()
        store.put(StoredResponse(response, [*messages, *item_messages(response["output"])], previous))


def _stored(store: ResponseStore, response_id: str | None, param: str) -> StoredResponse | None:
    """The stored response of that id (None for no id); an id never stored, forgotten, or created with
    `store: false` is a 404."""
    if response_id is None:
        return None
    stored = store.get(response_id)
    if stored is None:
        raise OpenAIError(404, f"Response with id '{response_id}' not found.", param=param, code="response_not_found")
    return stored
