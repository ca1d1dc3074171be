"""The Responses API's `instructions` and `input` (a string, or a list of input items) as chat messages in the
shape chat templates take (server/chat_messages.py): a message item as {"role", "content": str}, a function_call
item as an assistant message's tool call (its arguments parsed), a function_call_output item as a tool message.
A response's output items are input items too, so the store keeps a turn's output through the same reading."""
from __future__ import annotations

from server.chat_messages import TEMPLATE_ROLES, template_tool_call
from server.errors import bad_request

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
    return item_messages(value)


def item_messages(items: list) -> list[dict]:
    """Input (or output) items as messages. A function_call joins the assistant message before it, as chat writes
    one assistant turn with its text and all its calls."""
    messages: list[dict] = []
    for i, item in enumerate(items):
        message = _item_message(item, f"input[{i}]")
        previous = messages[-1] if messages else None
        if "tool_calls" in message and previous is not None and previous["role"] == "assistant":
            previous["tool_calls"] = previous.get("tool_calls", []) + message["tool_calls"]
        else:
            messages.append(message)
    return messages


def _item_message(item: object, where: str) -> dict:
    kind = (item.get("type") or "message") if isinstance(item, dict) else None
    if kind == "message":
        return _message(item, where)
    if kind == "function_call":
        return _function_call(item, where)
    if kind == "function_call_output":
        return {"role": "tool", "content": _text(item.get("output"), f"{where}.output"),
                "tool_call_id": _string(item, "call_id", where)}
    if kind is None:
        raise bad_request(f"{where} must be an object", param="input")
    raise bad_request(f"{where}: {kind} items are not supported", param="input")


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(_ROLES)}", param="input")
    return {"role": TEMPLATE_ROLES[role], "content": _text(item.get("content"), f"{where}.content")}


def _function_call(item: dict, where: str) -> dict:
    """An assistant message with this one call; it has no text of its own."""
    call_id, name = _string(item, "call_id", where), _string(item, "name", where)
    arguments = item.get("arguments")
    if isinstance(arguments, str):
        try:
            return {"role": "assistant", "content": "", "tool_calls": [template_tool_call(call_id, name, arguments)]}
        except ValueError:
            pass
    raise bad_request(f"{where}.arguments must be a string of JSON text", param="input")


def _text(value: object, where: str) -> str:
    """A string, or the text of an array of text parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(f"{where} must be a string or an array of text parts", param="input")
    if not all(isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str)
               for part in value):
        raise bad_request(f"{where}: only input_text and output_text parts are supported", param="input")
    return "".join(part["text"] for part in value)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{where}.{key} must be a non-empty string", param="input")
    return value
