"""One Responses API response, built from the engine's outputs: the Response object at each stage and, when
streamed, OpenAI's events between them, each numbered: response.created, response.in_progress, the events of the
output items (server/response_output.py: a message, function calls), and last response.completed (or
response.incomplete when max_output_tokens cut it short)."""
from __future__ import annotations

import time
import uuid

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.choices import Collector
from server.errors import OpenAIError
from server.response_output import ResponseOutput
from server.streaming import EventFraming, sse_event
from server.tool_parsers import ToolParser


class ResponseBuilder:
    """parser: the request's tool parser, None when its output is plain text."""

    def __init__(self, model: str, body: dict, params: SamplingParams, parser: ToolParser | None) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.model = model
        self.body = body  # the request, whose settings the Response object repeats
        self.params = params
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.collector = Collector(1)
        self.output = ResponseOutput(parser)
        self._sequence_number = 0

    @property
    def started(self) -> bool:
        return bool(self.collector.choices)

    @property
    def status(self) -> str:
        finish_reason = self.collector.choices[0].finish_reason if self.started else None
        if finish_reason is None:
            return "in_progress"
        return "incomplete" if finish_reason == "length" else "completed"

    def add(self, out: RequestOutput) -> list[dict]:
        """Records one engine output; returns the stream events it makes (none unless streamed: a whole output
        is read once it ended)."""
        [(index, delta, _)] = self.collector.add(0, out)
        if self.status == "completed":
            self.completed_at = int(time.time())
        if self.body.get("stream"):
            return [self._numbered(event) for event in self.output.stream(delta.text, delta.finished)]
        if delta.finished:
            self.output.whole(self.collector.choices[index].text)
        return []

    def response(self) -> dict:
        """The Response object as it stands: no output while in progress, the output items and usage once done."""
        done = self.status != "in_progress"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "completed_at": self.completed_at, "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": self.body.get("instructions"), "max_output_tokens": self.body.get("max_output_tokens"),
            "metadata": self.body.get("metadata") or {}, "model": self.model,
            "output": self.output.items(self.status) if done else [],
            "parallel_tool_calls": self._requested("parallel_tool_calls", True),
            "previous_response_id": self.body.get("previous_response_id"),
            "temperature": self.params.temperature, "top_p": self.params.top_p,
            "text": {"format": {"type": "text"}} | (self.body.get("text") or {}),
            "tool_choice": self._requested("tool_choice", "auto"), "tools": self._requested("tools", []),
            "truncation": self._requested("truncation", "disabled"), "user": self.body.get("user"),
            "usage": self._usage() if done else None,
        }

    def opening_events(self) -> list[dict]:
        """Built before the first output is added, so that they show none of it."""
        response = self.response()
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def closing_events(self) -> list[dict]:
        items = [self._numbered(event) for event in self.output.closing_events(self.status)]
        return items + [self._event(f"response.{self.status}", response=self.response())]

    def error_event(self, error: OpenAIError) -> dict:
        return self._event("error", code=error.code, message=error.message, param=error.param)

    def _usage(self) -> dict:
        usage = self.collector.usage()
        # cache_write_tokens: prefix caching is automatic, so no request writes to a cache on purpose.
        return {"input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                                         "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"]}

    def _requested(self, name: str, default: object) -> object:
        value = self.body.get(name)
        return default if value is None else value

    def _event(self, kind: str, **fields: object) -> dict:
        return self._numbered({"type": kind, **fields})

    def _numbered(self, event: dict) -> dict:
        event["sequence_number"] = self._sequence_number
        self._sequence_number += 1
        return event


class ResponseEventFraming(EventFraming):
    """The Responses API's framing: each event named by its type (`event: response.created`), a failure as a
    numbered `error` event, and no [DONE] (the response.completed event ends the stream)."""

    end = b""

    def __init__(self, builder: ResponseBuilder) -> None:
        self.builder = builder

    def event(self, data: dict) -> bytes:
        return b"event: " + data["type"].encode() + b"\n" + sse_event(data)

    def error(self, error: OpenAIError) -> bytes:
        return self.event(self.builder.error_event(error))
