"""Tool parsers: a model's output to content and tool calls, streamed or whole. The auto ones, chosen with
`--tool-call-parser` (vLLM's names), read the format a model was trained to call tools in; the forced ones read
what the grammar of tool_choice "required" or a named function produced."""
from __future__ import annotations

from server.tool_parsers.base import (DeltaMessage, ExtractedToolCalls, ToolCall, ToolCallDelta, ToolParser,
                                      extract_tool_calls)
from server.tool_parsers.forced import NamedToolParser, RequiredToolParser, arguments_schema, required_calls_schema
from server.tool_parsers.hermes import HermesToolParser
from server.tool_parsers.llama3_json import Llama3JsonToolParser
from server.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser,
                                             "mistral": MistralToolParser}

__all__ = ["TOOL_PARSERS", "DeltaMessage", "ExtractedToolCalls", "NamedToolParser", "RequiredToolParser", "ToolCall",
           "ToolCallDelta", "ToolParser", "arguments_schema", "extract_tool_calls", "required_calls_schema"]
