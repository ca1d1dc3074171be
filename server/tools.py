"""A request's tools and tool_choice: which tools the chat template shows, which grammar forces calls, and which
parser reads each choice's output.

- "none": the template still shows the tools (as vLLM does), the output is text.
- "auto" (the default with tools): the model decides; the parser of `--tool-call-parser` finds its calls. Without
  `--enable-auto-tool-choice` it is a 400, as in vLLM, since nothing could read the calls.
- "required" and a named function: a grammar forces calls that parse and validate (tool_parsers/forced.py).

`tool_calling` takes the tools and choice once parsed; `request_tool_calling` parses them from a request of chat
completions or of the Responses API, which differ only in where a function's fields are (`ToolForm`).
Every mistake is a 400 naming its field.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.structured_output import StructuredOutputsParams, check
from server.errors import bad_request
from server.structured_outputs import constraint_fields
from server.tool_parsers import NamedToolParser, RequiredToolParser, ToolParser, arguments_schema, required_calls_schema

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine.sampling_params import SamplingParams

_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None = None
    parameters: dict | None = None  # the JSON schema of its arguments; None: it takes none

    def template_dict(self) -> dict:
        """As chat templates take a tool: OpenAI's chat form."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {key: value for key, value in function.items() if value is not None}}


@dataclass(frozen=True)
class ToolCalling:
    """What a request asked of its tools; the default asks nothing."""
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: str = "none"  # "none", "auto", "required", or "function": the one named `function`
    function: str | None = None
    structured_outputs: StructuredOutputsParams | None = None  # the grammar of "required" and a named function
    auto_parser: type[ToolParser] | None = None  # under "auto": the --tool-call-parser

    def template_tools(self) -> list[dict] | None:
        return template_tools(self.tools)

    def adjust_request(self, params: SamplingParams, tokenizer: PreTrainedTokenizerBase) -> None:
        """As vLLM's parsers adjust a request: a parser whose markers the tokenizer marks special must see them."""
        if self.auto_parser is not None and self.auto_parser.markers_are_special(tokenizer):
            params.skip_special_tokens = False

    def check_sole_constraint(self, other: str | None) -> None:
        """A 400 when the grammar of tool_choice and the request's own constraint (the field `other`; None: it has
        none) would both shape the output."""
        if self.structured_outputs is not None and other is not None:
            raise bad_request(f"tool_choice {self.tool_choice} and {other} each constrain the output: send one",
                              param=other)

    def new_parser(self) -> ToolParser | None:
        """A parser for one choice's output, None when the output is plain text."""
        if self.tool_choice == "required":
            return RequiredToolParser()
        if self.tool_choice == "function":
            return NamedToolParser(self.function)
        return self.auto_parser() if self.auto_parser is not None else None


def tool_calling(tools: list[FunctionTool], tool_choice: str, function: str | None, parallel_tool_calls: bool,
                 auto_parser: type[ToolParser] | None) -> ToolCalling:
    """tool_choice: none, auto, required, or function (then `function` names it)."""
    if not tools:
        if tool_choice in ("required", "function"):
            raise bad_request("tool_choice required or a named function needs tools", param="tool_choice")
        return ToolCalling()
    if tool_choice == "auto" and auto_parser is None:
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
                          '(tool_choice defaults to "auto" when tools are given)', param="tool_choice")
    by_name = {tool.name: tool for tool in tools}
    if tool_choice == "function" and function not in by_name:
        raise bad_request(f"tool_choice names the function {function!r}, which is not among tools", param="tool_choice")
    try:
        if tool_choice == "required":
            schema = required_calls_schema([(tool.name, tool.parameters) for tool in tools], parallel_tool_calls)
        else:
            schema = arguments_schema(by_name[function].parameters) if tool_choice == "function" else None
        constraint = StructuredOutputsParams(json=schema) if schema is not None else None
        if constraint is not None:
            check(constraint)
    except ValueError as e:
        raise bad_request(f"tools: {e}", param="tools") from None
    return ToolCalling(tuple(tools), tool_choice, function, constraint, auto_parser if tool_choice == "auto" else None)


def template_tools(tools: Sequence[FunctionTool]) -> list[dict] | None:
    """As chat templates take tools: OpenAI's chat form; None for none."""
    return [tool.template_dict() for tool in tools] or None


@dataclass(frozen=True)
class ToolForm:
    """Where an API's request keeps a function's name, description and parameters: chat completions nest them
    under "function" (in each tool and in a named tool_choice), the Responses API puts them beside "type"."""
    nested: bool

    def function(self, value: object) -> object:
        """The function's fields of a tool or a named tool_choice; None when value is no function one."""
        if not isinstance(value, dict) or value.get("type") != "function":
            return None
        return value.get("function") if self.nested else value

    def where(self, where: str) -> str:
        return f"{where}.function" if self.nested else where

    def shape(self, fields: str) -> str:
        """As the API writes a function with these fields, for error messages."""
        inner = f'"function": {{{fields}}}' if self.nested else fields
        return f'{{"type": "function", {inner}}}'


CHAT_FORM = ToolForm(nested=True)
RESPONSES_FORM = ToolForm(nested=False)


def request_tool_calling(body: dict, form: ToolForm, auto_parser: type[ToolParser] | None) -> ToolCalling:
    """From the request's tools, tool_choice and parallel_tool_calls."""
    tools = function_tools(body, form)
    tool_choice, function = _tool_choice(body.get("tool_choice"), bool(tools), form)
    return tool_calling(tools, tool_choice, function, body.get("parallel_tool_calls") is not False, auto_parser)


def chat_tool_calling(body: dict, auto_parser: type[ToolParser] | None) -> ToolCalling:
    """From chat's tools, tool_choice and parallel_tool_calls; tool_choice's grammar and the request's own
    constraint (response_format, ...) cannot both apply."""
    calling = request_tool_calling(body, CHAT_FORM, auto_parser)
    calling.check_sole_constraint(next(iter(constraint_fields(body)), None))
    return calling


def function_tools(body: dict, form: ToolForm) -> list[FunctionTool]:
    """The request's tools, each {"type": "function", ...} with the function's fields where form keeps them."""
    parsed = [_function_tool(tool, f"tools[{i}]", form) for i, tool in enumerate(body.get("tools") or [])]
    names = [tool.name for tool in parsed]
    if len(set(names)) < len(names):
        raise bad_request("tools must have distinct names", param="tools")
    return parsed


def _function_tool(tool: object, where: str, form: ToolForm) -> FunctionTool:
    function = form.function(tool)
    if not isinstance(function, dict):
        raise bad_request(f"{where} must be {form.shape('...')} (only function tools are supported)", param="tools")
    where = form.where(where)
    name, description, parameters = function.get("name"), function.get("description"), function.get("parameters")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{where}.name must be a non-empty string", param="tools")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{where}.description must be a string", param="tools")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"{where}.parameters must be a JSON Schema object", param="tools")
    return FunctionTool(name, description, parameters)


def _tool_choice(value: object, has_tools: bool, form: ToolForm) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if has_tools else "none"), None
    if value in _CHOICES:
        return value, None
    function = form.function(value)
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return "function", function["name"]
    named = form.shape('"name": ...')
    raise bad_request(f'tool_choice must be "none", "auto", "required" or {named}', param="tool_choice")
