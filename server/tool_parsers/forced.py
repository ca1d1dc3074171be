"""Calls the grammar forces, for tool_choice "required" and a named function; no guessing at the model's format.

"required": the output is a JSON array of at least one (exactly one without parallel_tool_calls) object
{"name": <a tool's name>, "parameters": <arguments valid for that tool>}, as vLLM constrains it. A named function:
the output is its arguments, valid for its schema. Either way every call parses and validates.
"""
from __future__ import annotations

from collections.abc import Sequence

from server.tool_parsers.base import State, ToolParser

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}
_DEFINITIONS = ("$defs", "definitions")  # where references ("#/$defs/Name") point: the root of a schema


def arguments_schema(parameters: dict | None) -> dict:
    """A tool's parameters schema; a tool without one takes no arguments."""
    return parameters if parameters is not None else _EMPTY_PARAMETERS


def required_calls_schema(tools: Sequence[tuple[str, dict | None]], parallel_tool_calls: bool) -> dict:
    """The JSON schema of the calls tool_choice "required" allows, from (name, parameters) pairs. Each tool's
    definitions move to the root, where its references point; two tools defining one name differently is a
    ValueError."""
    definitions: dict[str, dict] = {key: {} for key in _DEFINITIONS}
    calls = []
    for name, parameters in tools:
        parameters = dict(arguments_schema(parameters))
        for key in _DEFINITIONS:
            for def_name, schema in parameters.pop(key, {}).items():
                if definitions[key].setdefault(def_name, schema) != schema:
                    raise ValueError(f"two tools define {key}/{def_name} differently")
        calls.append({"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                      "required": ["name", "parameters"]})
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema | {key: value for key, value in definitions.items() if value}


class RequiredToolParser(ToolParser):
    def _start(self) -> State | None:
        return self._array_start


class NamedToolParser(ToolParser):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def _start(self) -> State | None:
        self._start_call(self.name)
        return self._arguments_text

    def _arguments_text(self) -> State | None:
        self._emit_arguments(self._buffer)
        self._buffer = ""
        return None
