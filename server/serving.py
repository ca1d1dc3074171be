"""What chat and text completions share: the response envelope, streaming chunks, and the full response."""
from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

from aiohttp import web

from engine.outputs import CompletionOutput, RequestOutput
from server.choices import Choice, Collector
from server.protocol import StreamOptions
from server.streaming import stream_events

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Completion:
    """One response being built from the engine's outputs; subclasses shape the choices."""

    object_name: str
    chunk_object_name: str

    def __init__(self, request_id: str, model: str, n: int, options: StreamOptions, top_logprobs: int | None,
                 tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.options = options
        self.top_logprobs = top_logprobs
        self.tokenizer = tokenizer
        self.collector = Collector(n)

    def chunk_choice(self, index: int, delta: CompletionOutput, first: bool) -> dict | None:
        """The streamed choice for one delta, or None when it carries nothing (text held back for a stop string)."""
        raise NotImplementedError

    def final_choice(self, index: int, choice: Choice) -> dict:
        raise NotImplementedError

    def envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    async def respond(self, request: web.Request,
                      outputs: AsyncGenerator[tuple[int, RequestOutput], None]) -> web.StreamResponse:
        if self.options.stream:
            return await stream_events(request, self._chunks(outputs))
        async with aclosing(outputs):
            async for prompt_index, out in outputs:
                self.collector.add(prompt_index, out)
        choices = [self.final_choice(index, choice) for index, choice in self.collector.sorted_choices()]
        return web.json_response(self.envelope(self.object_name, choices) | {"usage": self.collector.usage()})

    async def _chunks(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncGenerator[list[dict], None]:
        async with aclosing(outputs):
            async for prompt_index, out in outputs:
                choices = (self.chunk_choice(index, delta, first)
                           for index, delta, first in self.collector.add(prompt_index, out))
                yield [self.envelope(self.chunk_object_name, [choice]) for choice in choices if choice is not None]
        if self.options.include_usage:
            yield [self.envelope(self.chunk_object_name, []) | {"usage": self.collector.usage()}]
