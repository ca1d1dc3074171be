"""One Responses API response, built from the engine's outputs: the Response object at each stage and, when
streamed, OpenAI's events between them, each numbered: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta (one per new text),
response.output_text.done, response.content_part.done, response.output_item.done, and last response.completed
(or response.incomplete when max_output_tokens cut it short)."""
from __future__ import annotations

import time
import uuid

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.choices import Collector
from server.errors import OpenAIError
from server.streaming import EventFraming, sse_event

_MESSAGE = {"output_index": 0}  # the one output item: the assistant's message
_TEXT = {"output_index": 0, "content_index": 0}  # its one content part: the text


class ResponseBuilder:
    def __init__(self, model: str, body: dict, params: SamplingParams) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.body = body  # the request, whose settings the Response object repeats
        self.params = params
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.collector = Collector(1)
        self._sequence_number = 0

    @property
    def started(self) -> bool:
        return bool(self.collector.choices)

    @property
    def text(self) -> str:
        return self.collector.choices[0].text if self.started else ""

    @property
    def status(self) -> str:
        finish_reason = self.collector.choices[0].finish_reason if self.started else None
        if finish_reason is None:
            return "in_progress"
        return "incomplete" if finish_reason == "length" else "completed"

    def add(self, out: RequestOutput) -> str:
        """Records one engine output; returns the text it adds."""
        [(_, delta, _)] = self.collector.add(0, out)
        if self.status == "completed":
            self.completed_at = int(time.time())
        return delta.text

    def response(self) -> dict:
        """The Response object as it stands: no output while in progress, the message and usage once done."""
        done = self.status != "in_progress"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "completed_at": self.completed_at, "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": self.body.get("instructions"), "max_output_tokens": self.body.get("max_output_tokens"),
            "metadata": self.body.get("metadata") or {}, "model": self.model,
            "output": [self._message()] if done else [],
            "parallel_tool_calls": self._requested("parallel_tool_calls", True),
            "previous_response_id": self.body.get("previous_response_id"),
            "temperature": self.params.temperature, "top_p": self.params.top_p,
            "text": {"format": {"type": "text"}} | (self.body.get("text") or {}),
            "tool_choice": self._requested("tool_choice", "auto"), "tools": self._requested("tools", []),
            "truncation": self._requested("truncation", "disabled"), "user": self.body.get("user"),
            "usage": self._usage() if done else None,
        }

    def opening_events(self) -> list[dict]:
        """Up to the empty text part; built before the first output is added, so that they show none of it."""
        response = self.response()
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response),
                self._event("response.output_item.added", **_MESSAGE, item=self._message()),
                self._event("response.content_part.added", item_id=self.message_id, **_TEXT, part=self._text_part())]

    def delta_events(self, text: str) -> list[dict]:
        if not text:  # text held back while it could still become a stop string
            return []
        return [self._event("response.output_text.delta", item_id=self.message_id, **_TEXT, delta=text, logprobs=[])]

    def closing_events(self) -> list[dict]:
        return [self._event("response.output_text.done", item_id=self.message_id, **_TEXT, text=self.text,
                            logprobs=[]),
                self._event("response.content_part.done", item_id=self.message_id, **_TEXT, part=self._text_part()),
                self._event("response.output_item.done", **_MESSAGE, item=self._message()),
                self._event(f"response.{self.status}", response=self.response())]

    def error_event(self, error: OpenAIError) -> dict:
        return self._event("error", code=error.code, message=error.message, param=error.param)

    def _message(self) -> dict:
        status = self.status
        content = [self._text_part()] if self.started else []
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def _text_part(self) -> dict:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

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
        event = {"type": kind, "sequence_number": self._sequence_number, **fields}
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
