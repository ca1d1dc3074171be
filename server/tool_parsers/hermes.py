"""Hermes 2 Pro, Qwen 2.5 and the Hermes-format prompt of engine/hermes_tool_prompt.py: each call is a JSON object
{"name", "arguments"} between <tool_call> and </tool_call>; text around the blocks is content."""
from __future__ import annotations

from server.tool_parsers.base import State, ToolParser

CALL_START, CALL_END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    markers = (CALL_START, CALL_END)

    def _text(self) -> State | None:
        return self._call if self._content_until(CALL_START) else None

    def _call(self) -> State | None:
        return self._call_end if self._scan_call() else None

    def _call_end(self) -> State | None:
        return self._text if self._drop_until(CALL_END) else None
