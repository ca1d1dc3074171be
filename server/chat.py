"""POST /v1/chat/completions."""
from __future__ import annotations

import uuid

from aiohttp import web

from engine.outputs import CompletionOutput
from server.beam_search import beam_search_params
from server.chat_messages import chat_messages
from server.choices import Choice
from server.errors import bad_request
from server.fields import CHAT_REFUSED, check_fields
from server.generation import generate_many
from server.logprobs import chat_logprobs, prompt_logprobs_json
from server.protocol import (CHAT_FIELDS, chat_prompt, chat_template_options, check_model, check_types, read_json,
                             require_tokenizer, sampling_params, stream_options, vocab_size)
from server.serving import Completion
from server.state import STATE
from server.tool_parsers import DeltaMessage, ToolCall, ToolCallDelta, ToolParser, extract_tool_calls
from server.tools import ToolCalling, chat_tool_calling


class ChatCompletion(Completion):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, *args, tool_calling: ToolCalling, roles: list[str], echoes: list[str], **kwargs) -> None:
        """Per conversation (one, or a batch's): roles, its answer's role (the assistant's, or with
        add_generation_prompt false its last message's); echoes, the text its answer starts with (its last
        message's, when the request echoes a message of that role)."""
        super().__init__(*args, **kwargs)
        self.tool_calling = tool_calling
        self.roles = roles
        self.echoes = echoes
        self._parsers: dict[int, ToolParser | None] = {}  # per streamed choice

    def chunk_choice(self, index: int, delta: CompletionOutput, first: bool) -> dict | None:
        if first:
            self._parsers[index] = self.tool_calling.new_parser()
        parser = self._parsers[index]
        if parser is None:
            if not (first or delta.text or delta.finish_reason or delta.token_ids):
                return None
            message, called = {"content": delta.text}, False
        else:  # text a parser holds back (a call's name not yet complete, say) makes no chunk, unless for logprobs
            message, called = _delta_message(parser.feed(delta.text, final=delta.finished), first), parser.tools_called
            if not (first or message or delta.finish_reason or (delta.token_ids and self.top_logprobs is not None)):
                return None
        if first:
            message = {"role": self.roles[self.collector.prompt_of(index)]} | message
            if echo := self.echoes[self.collector.prompt_of(index)]:
                message["content"] = echo + (message.get("content") or "")
        return {"index": index, "delta": message, "logprobs": self._logprobs(delta.token_ids, delta.logprobs),
                "finish_reason": _finish_reason(delta.finish_reason, called)}

    def final_choice(self, index: int, choice: Choice) -> dict:
        parser = self.tool_calling.new_parser()
        extracted = extract_tool_calls(parser, choice.text) if parser is not None else None
        content = extracted.content if extracted else choice.text
        if echo := self.echoes[self.collector.prompt_of(index)]:
            content = echo + (content or "")
        message = {"role": self.roles[self.collector.prompt_of(index)], "content": content, "refusal": None}
        if extracted and extracted.tool_calls:
            message["tool_calls"] = [_tool_call(call) for call in extracted.tool_calls]
        return {"index": index, "message": message, "logprobs": self._logprobs(choice.token_ids, choice.logprobs),
                "finish_reason": _finish_reason(choice.finish_reason, "tool_calls" in message),
                "stop_reason": choice.stop_reason, "token_ids": self.token_ids(choice.token_ids)}

    def response_fields(self) -> dict:
        """The prompt's logprobs and ids; a batch of several conversations has no one prompt (null)."""
        if len(self.roles) > 1:
            return {"prompt_logprobs": None, "prompt_token_ids": None}
        logprobs = self.collector.prompt_logprobs.get(0)
        return {"prompt_logprobs": prompt_logprobs_json(logprobs),
                "prompt_token_ids": self.token_ids(self.collector.prompt_token_ids[0])}

    def chunk_fields(self, index: int, first: bool) -> dict:
        return {"prompt_token_ids": self.collector.prompt_token_ids[0]} if first and self.return_token_ids else {}

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
        if self.top_logprobs is None or not logprobs:
            return None
        return chat_logprobs(self.token_name, token_ids, logprobs, self.top_logprobs)


def _finish_reason(reason: str | None, tools_called: bool) -> str | None:
    return "tool_calls" if reason == "stop" and tools_called else reason


def _delta_message(delta: DeltaMessage, first: bool) -> dict:
    message = {"content": delta.content} if delta.content or first else {}
    if delta.tool_calls:
        message["tool_calls"] = [_tool_call_delta(call) for call in delta.tool_calls]
    return message


def _tool_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_call_delta(call: ToolCallDelta) -> dict:
    """OpenAI's chunks: the first of a call carries its id, type and name (and maybe arguments), later ones only
    arguments."""
    if call.id is None:
        return {"index": call.index, "function": {"arguments": call.arguments}}
    return {"index": call.index} | _tool_call(ToolCall(call.id, call.name, call.arguments))


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    return await _respond(request, body, [body.get("messages")])


async def create_batch_chat_completion(request: web.Request) -> web.StreamResponse:
    """vLLM's POST /v1/chat/completions/batch: `messages` holds several conversations, answered in one response
    whose choice i (with n = 1) answers conversation i; not streamed."""
    body = await read_json(request)
    conversations = body.get("messages")
    if not isinstance(conversations, list) or not conversations or not all(isinstance(c, list) for c in conversations):
        raise bad_request("messages must be a non-empty array of conversations (arrays of messages)", param="messages")
    if body.get("stream"):
        raise bad_request("stream is not available on /v1/chat/completions/batch", param="stream")
    return await _respond(request, body, conversations)


async def _respond(request: web.Request, body: dict, conversations: list) -> web.StreamResponse:
    state = request.app[STATE]
    check_fields(body, CHAT_FIELDS, CHAT_REFUSED)
    check_types(body, CHAT_FIELDS)
    check_model(body, state.llm.model_name)
    options = stream_options(body)
    top_logprobs = _top_logprobs(body)
    tool_calling = chat_tool_calling(body, state.tool_parser)
    # max_completion_tokens replaced max_tokens in OpenAI's API; both are still sent by clients.
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = sampling_params(body, body.get(max_name), top_logprobs, vocab_size(state.llm),
                             {"logprobs": "top_logprobs", "max_tokens": max_name}, tool_calling.structured_outputs)
    require_tokenizer(state.llm)
    tool_calling.adjust_request(params, state.llm.tokenizer)
    beam = beam_search_params(body, params)
    template = chat_template_options(body, state)
    prompts, roles, echoes = [], [], []
    for conversation in conversations:
        messages = chat_messages({"messages": conversation})
        prompts.append(await chat_prompt(state.llm, messages, tool_calling.template_tools(), options=template))
        role = "assistant" if template.add_generation_prompt else conversation[-1]["role"]
        # As vLLM: echo repeats the last message when it is of the answer's role (the message the answer goes on).
        echoes.append(messages[-1]["content"] if body.get("echo") and conversation[-1]["role"] == role else "")
        roles.append(role)
    completion = ChatCompletion(f"chatcmpl-{uuid.uuid4().hex}", state.llm.model_name, params.n, options,
                                top_logprobs, state.llm.tokenizer, body, tool_calling=tool_calling, roles=roles,
                                echoes=echoes)
    return await completion.respond(request, generate_many(state, prompts, params, completion.id, beam))


def _top_logprobs(body: dict) -> int | None:
    """logprobs: true asks for the sampled tokens' logprobs, top_logprobs for that many alternatives each."""
    top = body.get("top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    return (top or 0) if body.get("logprobs") else None
