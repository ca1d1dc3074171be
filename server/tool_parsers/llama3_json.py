"""Llama 3.1 to 3.3 with JSON tool calls: the whole output is one or more objects {"name", "parameters"} separated
by ";", possibly after <|python_tag|>. Whether an output is calls shows in its first characters; one that begins
otherwise is all content."""
from __future__ import annotations

from server.tool_parsers.base import State, ToolParser

PYTHON_TAG = "<|python_tag|>"
_SPACE = " \t\r\n"


class Llama3JsonToolParser(ToolParser):
    markers = (PYTHON_TAG,)

    def _start(self) -> State | None:
        head = self._buffer.lstrip(_SPACE)
        if not self._final and (not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG)):
            return None  # too early to tell
        if head.startswith(PYTHON_TAG):
            self._buffer = head[len(PYTHON_TAG):]
            return self._call
        return self._call if head.startswith("{") else self._text

    def _call(self) -> State | None:
        return self._next_call if self._scan_call() else None

    def _next_call(self) -> State | None:
        self._buffer = self._buffer.lstrip(_SPACE + ";")
        if not self._buffer:
            return None
        return self._call if self._buffer[0] == "{" else self._text
