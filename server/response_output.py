"""The output items of one response as its text is read, and OpenAI's stream events that open, grow and close
them: a message for the text (response.output_item.added, response.content_part.added, response.output_text.delta
..., then .done for each) and a function_call item per tool call the request's parser finds
(response.output_item.added, response.function_call_arguments.delta ..., then .done for each). Items are numbered
in the order they begin; each closes when the output ends. Events come without their sequence_number, which the
response adds (server/response_builder.py)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from server.tool_parsers import DeltaMessage, ToolCallDelta, ToolParser, extract_tool_calls

_TEXT = {"content_index": 0}  # a message's one content part: the text


@dataclass
class _Message:
    id: str
    output_index: int
    text: str = ""

    def item(self, status: str) -> dict:
        """Its text part once it is done; none while in progress, as OpenAI adds it with its own event."""
        content = [] if status == "in_progress" else [text_part(self.text)]
        return {"id": self.id, "type": "message", "role": "assistant", "status": status, "content": content}


@dataclass
class _FunctionCall:
    id: str
    output_index: int
    call_id: str
    name: str
    arguments: str = ""

    def item(self, status: str) -> dict:
        return {"id": self.id, "type": "function_call", "call_id": self.call_id, "name": self.name,
                "arguments": self.arguments, "status": status}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseOutput:
    """The items of one output. parser: the request's tool parser; None when its output is plain text."""

    def __init__(self, parser: ToolParser | None) -> None:
        self._parser = parser
        self._items: list[_Message | _FunctionCall] = []
        self._message: _Message | None = None
        self._calls: dict[int, _FunctionCall] = {}  # by the parser's index of the call

    def items(self, status: str) -> list[dict]:
        return [item.item(status) for item in self._items]

    def stream(self, text: str, final: bool) -> list[dict]:
        """Reads the output as it streams; returns the events of what it adds."""
        delta = self._parser.feed(text, final) if self._parser is not None else DeltaMessage(text)
        return self._add(delta, final)

    def whole(self, text: str) -> None:
        """Reads the output in one piece: a call that does not parse (cut short, say) leaves it all text."""
        if self._parser is None:
            self._add(DeltaMessage(text), final=True)
            return
        extracted = extract_tool_calls(self._parser, text)
        calls = [ToolCallDelta(i, call.id, call.name, call.arguments) for i, call in enumerate(extracted.tool_calls)]
        self._add(DeltaMessage(extracted.content or "", calls), final=True)

    def closing_events(self, status: str) -> list[dict]:
        return [event for item in self._items for event in _closing(item, status)]

    def _add(self, delta: DeltaMessage, final: bool) -> list[dict]:
        """An output with neither text nor calls still answers with an (empty) message."""
        events = []
        if delta.content:
            events += self._open_message() if self._message is None else []
            self._message.text += delta.content
            events.append(_event("response.output_text.delta", self._message, **_TEXT, delta=delta.content,
                                 logprobs=[]))
        for call in delta.tool_calls:
            if call.id is not None:
                events += self._open_call(call)
            if call.arguments:
                self._calls[call.index].arguments += call.arguments
                events.append(_event("response.function_call_arguments.delta", self._calls[call.index],
                                     delta=call.arguments))
        if final and not self._items:
            events += self._open_message()
        return events

    def _open_message(self) -> list[dict]:
        self._message = _Message(f"msg_{uuid.uuid4().hex}", len(self._items))
        self._items.append(self._message)
        return [_item_event("response.output_item.added", self._message, "in_progress"),
                _event("response.content_part.added", self._message, **_TEXT, part=text_part(""))]

    def _open_call(self, call: ToolCallDelta) -> list[dict]:
        function_call = _FunctionCall(f"fc_{uuid.uuid4().hex}", len(self._items), call.id, call.name)
        self._calls[call.index] = function_call
        self._items.append(function_call)
        return [_item_event("response.output_item.added", function_call, "in_progress")]


def _closing(item: _Message | _FunctionCall, status: str) -> list[dict]:
    if isinstance(item, _Message):
        content = [_event("response.output_text.done", item, **_TEXT, text=item.text, logprobs=[]),
                   _event("response.content_part.done", item, **_TEXT, part=text_part(item.text))]
    else:
        content = [_event("response.function_call_arguments.done", item, name=item.name, arguments=item.arguments)]
    return content + [_item_event("response.output_item.done", item, status)]


def _item_event(kind: str, item: _Message | _FunctionCall, status: str) -> dict:
    return {"type": kind, "output_index": item.output_index, "item": item.item(status)}


def _event(kind: str, item: _Message | _FunctionCall, **fields: object) -> dict:
    """An event about what an item holds, naming it by id and output index."""
    return {"type": kind, "item_id": item.id, "output_index": item.output_index, **fields}
