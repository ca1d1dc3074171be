"""What every tool parser shares: the streamed pieces it emits, the calls it extracts, and a small state machine
over the model's text.

A parser reads the output as it streams (`feed`) and returns what can be told now: content, and tool-call deltas
shaped as OpenAI streams them (a call's index, id and name first, then its arguments in fragments). Text that
could still become a call (the start of a marker, trailing spaces) is held back until the next text decides it.
A whole output is parsed by the same code (`extract_tool_calls`), so streamed and complete responses agree.

A format is written as states: methods that consume the start of `self._buffer` and return the next state, or
None to wait for more text. Text outside the format's call syntax is content.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional

from server.tool_parsers.json_call import JsonCallScanner

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_SPACE = " \t\r\n"
State = Callable[[], Optional["State"]]


@dataclass
class ToolCallDelta:
    """One streamed piece of call `index`: its first carries the id and the name."""
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class DeltaMessage:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ExtractedToolCalls:
    content: str | None  # None when the output was only calls
    tool_calls: list[ToolCall]


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser:
    # Text the format relies on; where a tokenizer marks one as a special token, detokenization must keep it.
    markers: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._buffer = ""  # text read but not yet consumed by a state
        self._state: State = self._start
        self._final = False
        self._delta = DeltaMessage()
        self._held_space = ""  # trailing spaces of the content: dropped before a call
        self._scanner: JsonCallScanner | None = None
        self._call_named = False  # the current call's id and name went out
        self._arguments: list[str] = []  # per call, its arguments emitted so far
        self.failed = False  # some call did not parse: the output is better read as text

    @classmethod
    def markers_are_special(cls, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether the tokenizer marks one of the format's markers as a special token, which detokenization would
        drop unless told to keep special tokens (as vLLM's parsers adjust the request)."""
        special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        return any(marker in special for marker in cls.markers)

    @property
    def tools_called(self) -> bool:
        return bool(self._arguments)

    def feed(self, text: str, final: bool = False) -> DeltaMessage:
        """The deltas that text makes known; final: the output ends here, nothing more is held back."""
        self._buffer += text
        self._final = final
        while (state := self._state()) is not None:
            self._state = state
        if final:
            self._finish()
        delta, self._delta = self._delta, DeltaMessage()
        return delta

    def _finish(self) -> None:
        if not self.tools_called:
            self._delta.content += self._held_space
        self._held_space = ""
        self.failed |= self._scanner is not None or not all(map(_is_json, self._arguments))

    # States every format starts from or returns to; subclasses override _start and _text.
    def _start(self) -> State | None:
        return self._text

    def _text(self) -> State | None:
        self._emit_content(self._buffer)
        self._buffer = ""
        return None

    def _array_start(self) -> State | None:
        """A JSON array of call objects; anything else is content."""
        self._buffer = self._buffer.lstrip(_SPACE)
        if not self._buffer:
            return None
        if self._buffer[0] != "[":
            return self._text
        self._buffer = self._buffer[1:]
        return self._array_item

    def _array_item(self) -> State | None:
        self._buffer = self._buffer.lstrip(_SPACE + ",")
        if not self._buffer:
            return None
        if self._buffer[0] == "]":
            self._buffer = self._buffer[1:]
            return self._text
        if self._buffer[0] != "{":
            self.failed = True
            return self._text
        return self._array_call

    def _array_call(self) -> State | None:
        return self._array_item if self._scan_call() else None

    # Helpers for states.
    def _content_until(self, marker: str) -> bool:
        """Content up to marker, which is consumed: True once it came. Without it, a tail that could begin it waits."""
        found = self._buffer.find(marker)
        if found >= 0:
            self._emit_content(self._buffer[:found])
            self._buffer = self._buffer[found + len(marker):]
            return True
        end = len(self._buffer) - (0 if self._final else _partial_marker_len(self._buffer, marker))
        self._emit_content(self._buffer[:end])
        self._buffer = self._buffer[end:]
        return False

    def _drop_until(self, marker: str) -> bool:
        found = self._buffer.find(marker)
        keep = 0 if found >= 0 or self._final else _partial_marker_len(self._buffer, marker)
        self._buffer = self._buffer[found + len(marker):] if found >= 0 else self._buffer[len(self._buffer) - keep:]
        return found >= 0

    def _scan_call(self) -> bool:
        """Reads a JSON call object, streaming its name and then its arguments; True once it ended. An object
        without a name is content; text that is no object is left in the buffer for the next state."""
        if self._scanner is None:
            self._buffer = self._buffer.lstrip(_SPACE)
            if not self._buffer:
                self.failed |= self._final  # the output ended where a call should begin
                return False
            self._scanner = JsonCallScanner()
        call = self._scanner
        self._buffer = self._buffer[call.feed(self._buffer):]
        if call.name is not None and not self._call_named:
            self._start_call(call.name)
        if self._call_named and call.arguments:
            self._emit_arguments(call.arguments[len(self._arguments[-1]):])
        if not call.done:
            return False
        if not self._call_named:
            self.failed = True
            self._emit_content(call.text)
        elif call.arguments is None:  # a function without parameters
            self._emit_arguments("{}")
        self._scanner, self._call_named = None, False
        return True

    def _start_call(self, name: str) -> None:
        self._held_space = ""  # the spaces before a call separate, they say nothing
        self._call_named = True
        self._arguments.append("")
        self._delta.tool_calls.append(ToolCallDelta(len(self._arguments) - 1, new_tool_call_id(), name))

    def _emit_arguments(self, text: str) -> None:
        if not text:
            return
        index = len(self._arguments) - 1
        self._arguments[index] += text
        calls = self._delta.tool_calls
        if calls and calls[-1].index == index:
            calls[-1].arguments += text
        else:
            calls.append(ToolCallDelta(index, arguments=text))

    def _emit_content(self, text: str) -> None:
        text = self._held_space + text
        content = text.rstrip(_SPACE)
        self._held_space = text[len(content):]
        self._delta.content += content


def extract_tool_calls(parser: ToolParser, text: str) -> ExtractedToolCalls:
    """A whole output, parsed as it would have streamed. If a call does not parse, all of it is content."""
    delta = parser.feed(text, final=True)
    if parser.failed:
        return ExtractedToolCalls(text, [])
    calls = [ToolCall(d.id, d.name, d.arguments) for d in delta.tool_calls]
    return ExtractedToolCalls(delta.content or (None if calls else ""), calls)


def _partial_marker_len(text: str, marker: str) -> int:
    """The length of the longest end of text that begins marker."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
