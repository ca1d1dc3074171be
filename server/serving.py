"""What chat and text completions share: the response envelope, streaming chunks, and the full response."""
from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

from aiohttp import web

from engine.outputs import CompletionOutput, RequestOutput
from server.choices import Choice, Collector
from server.logprobs import token_name
from server.protocol import StreamOptions
from server.streaming import stream_events

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Completion:
    """One response being built from the engine's outputs; subclasses shape the choices."""

    object_name: str
    chunk_object_name: str

    def __init__(self, request_id: str, model: str, n: int, options: StreamOptions, top_logprobs: int | None,
                 tokenizer: PreTrainedTokenizerBase | None, body: dict) -> None:
        """body: the request, for vLLM's return_token_ids and return_tokens_as_token_ids."""
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.options = options
        self.top_logprobs = top_logprobs
        self.return_token_ids = bool(body.get("return_token_ids"))
        self.token_name = token_name(tokenizer, bool(body.get("return_tokens_as_token_ids")))
        self.collector = Collector(n)

    def chunk_choice(self, index: int, delta: CompletionOutput, first: bool) -> dict | None:
        """The streamed choice for one delta, or None when it carries nothing (text held back for a stop string)."""
        raise NotImplementedError

    def final_choice(self, index: int, choice: Choice) -> dict:
        raise NotImplementedError

    def response_fields(self) -> dict:
        """What a full response has after its usage."""
        return {}

    def chunk_fields(self, index: int, first: bool) -> dict:
        """What a streamed chunk of choice `index` has besides its envelope and choice."""
        return {}

    def envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    def token_ids(self, token_ids: list[int]) -> list[int] | None:
        """A choice's token ids when the request asked for them (return_token_ids), else None."""
        return token_ids if self.return_token_ids else None

    async def respond(self, request: web.Request,
                      outputs: AsyncGenerator[tuple[int, RequestOutput], None]) -> web.StreamResponse:
        if self.options.stream:
            return await stream_events(request, self._chunks(outputs))
        async with aclosing(outputs):
            async for prompt_index, out in outputs:
                self.collector.add(prompt_index, out)
        choices = [self.final_choice(index, choice) for index, choice in self.collector.sorted_choices()]
        return web.json_response(self.envelope(self.object_name, choices) | {"usage": self.collector.usage()}
                                 | self.response_fields())

    async def _chunks(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncGenerator[list[dict], None]:
        async with aclosing(outputs):
            async for prompt_index, out in outputs:
                yield [chunk for index, delta, first in self.collector.add(prompt_index, out)
                       if (chunk := self._chunk(index, delta, first)) is not None]
        if self.options.include_usage:
            yield [self.envelope(self.chunk_object_name, []) | {"usage": self.collector.usage()}]

    def _chunk(self, index: int, delta: CompletionOutput, first: bool) -> dict | None:
        choice = self.chunk_choice(index, delta, first)
        if choice is None:
            return None
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        if self.return_token_ids:
            choice["token_ids"] = delta.token_ids
        chunk = self.envelope(self.chunk_object_name, [choice]) | self.chunk_fields(index, first)
        if self.options.continuous_usage_stats:
            chunk["usage"] = self.collector.choice_usage(index)
        return chunk
