"""POST /v1/chat/completions."""
from __future__ import annotations

import uuid

from aiohttp import web

from engine.outputs import CompletionOutput
from server.choices import Choice
from server.errors import bad_request
from server.fields import CHAT_REFUSED, check_fields
from server.generation import generate_many
from server.logprobs import chat_logprobs
from server.protocol import (CHAT_FIELDS, chat_prompt, check_model, check_types, read_json, require_tokenizer,
                             sampling_params, stream_options, vocab_size)
from server.serving import Completion
from server.state import STATE


class ChatCompletion(Completion):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def chunk_choice(self, index: int, delta: CompletionOutput, first: bool) -> dict | None:
        if not (first or delta.text or delta.finish_reason or delta.token_ids):
            return None
        message = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
        return {"index": index, "delta": message, "logprobs": self._logprobs(delta.token_ids, delta.logprobs),
                "finish_reason": delta.finish_reason}

    def final_choice(self, index: int, choice: Choice) -> dict:
        message = {"role": "assistant", "content": choice.text, "refusal": None}
        return {"index": index, "message": message, "logprobs": self._logprobs(choice.token_ids, choice.logprobs),
                "finish_reason": choice.finish_reason}

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
        if self.top_logprobs is None or not logprobs:
            return None
        return chat_logprobs(self.tokenizer, token_ids, logprobs, self.top_logprobs)


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    check_fields(body, CHAT_FIELDS, CHAT_REFUSED)
    check_types(body, CHAT_FIELDS)
    check_model(body, state.llm.model_name)
    options = stream_options(body)
    top_logprobs = _top_logprobs(body)
    # max_completion_tokens replaced max_tokens in OpenAI's API; both are still sent by clients.
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = sampling_params(body, body.get(max_name), top_logprobs, vocab_size(state.llm),
                             {"logprobs": "top_logprobs", "max_tokens": max_name})
    require_tokenizer(state.llm)
    prompt = await chat_prompt(state.llm, body)
    completion = ChatCompletion(f"chatcmpl-{uuid.uuid4().hex}", state.llm.model_name, params.n, options,
                                top_logprobs, state.llm.tokenizer)
    return await completion.respond(request, generate_many(state, [prompt], params, completion.id))


def _top_logprobs(body: dict) -> int | None:
    """logprobs: true asks for the sampled tokens' logprobs, top_logprobs for that many alternatives each."""
    top = body.get("top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    return (top or 0) if body.get("logprobs") else None
