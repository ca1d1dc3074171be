"""Tools in the Responses API, all in this one place: not supported yet. Tool calling is to be wired here from
chat completions' own: `tools` and `tool_choice` into the chat template and the tool parser, function_call and
function_call_output input items into assistant tool calls and tool messages, and the calls parsed from the
output into function_call output items."""
from __future__ import annotations

from server.errors import bad_request

TOOL_ITEM_TYPES = frozenset({"function_call", "function_call_output"})
_NO_TOOL_CHOICES = ("none", "auto")  # with no tools, neither asks for a call


def check_tools(body: dict) -> None:
    """A 400 unless the request has no tools: `tools` absent or empty, `tool_choice` absent, none or auto."""
    if body.get("tools"):
        raise bad_request("tools is not supported yet", param="tools")
    if body.get("tool_choice") not in (None, *_NO_TOOL_CHOICES):
        raise bad_request("tool_choice is not supported yet", param="tool_choice")


def tool_item_message(item: dict, index: int) -> dict:
    """The chat message of a function_call or function_call_output input item: none yet, without tools."""
    raise bad_request(f"input[{index}]: {item['type']} items are not supported yet", param="input")
