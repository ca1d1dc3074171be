"""The Responses API's `instructions` and `input` (a string, or a list of input items) as chat messages
{"role", "content": str}, which the chat template renders as for chat completions."""
from __future__ import annotations

from server.errors import bad_request
from server.response_tools import TOOL_ITEM_TYPES, tool_item_message

_ROLES = ("user", "system", "developer", "assistant")
# A message's content parts: what a user, system or developer writes; what an assistant wrote (a past output).
_TEXT_PARTS = frozenset({"input_text", "output_text"})


def instructions_messages(body: dict) -> list[dict]:
    """The system message in front of everything else. OpenAI does not carry a previous response's
    instructions over to the next, so they are no part of the stored conversation."""
    instructions = body.get("instructions")
    return [{"role": "system", "content": instructions}] if instructions else []


def input_messages(body: dict) -> list[dict]:
    """This turn's input: a string is one user message."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not value:
        raise bad_request("input must be a string or a non-empty array of input items", param="input")
    return [_item_message(item, i) for i, item in enumerate(value)]


def _item_message(item: object, i: int) -> dict:
    kind = (item.get("type") or "message") if isinstance(item, dict) else None
    if kind == "message":
        return _message(item, i)
    if kind in TOOL_ITEM_TYPES:
        return tool_item_message(item, i)
    if kind is None:
        raise bad_request(f"input[{i}] must be an object", param="input")
    raise bad_request(f"input[{i}]: {kind} items are not supported", param="input")


def _message(item: dict, i: int) -> dict:
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(f"input[{i}].role must be one of {', '.join(_ROLES)}", param="input")
    content = item.get("content")
    if isinstance(content, list):
        content = "".join(_text(part, i) for part in content)
    elif not isinstance(content, str):
        raise bad_request(f"input[{i}].content must be a string or an array of text parts", param="input")
    return {"role": role, "content": content}


def _text(part: object, i: int) -> str:
    if isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
        return part["text"]
    raise bad_request(f"input[{i}].content: only input_text and output_text parts are supported", param="input")
