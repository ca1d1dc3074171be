"""Mistral's models (tokenizer v3 and later): after the [TOOL_CALLS] token, a JSON array of {"name", "arguments"}
objects; text before it is content."""
from __future__ import annotations

from server.tool_parsers.base import State, ToolParser

TOOL_CALLS = "[TOOL_CALLS]"


class MistralToolParser(ToolParser):
    markers = (TOOL_CALLS,)

    def _text(self) -> State | None:
        return self._array_start if self._content_until(TOOL_CALLS) else None
