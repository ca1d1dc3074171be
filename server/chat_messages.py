"""A chat request's messages as the chat template takes them: {"role", "content": str}, text parts joined,
developer as the template's system role, other roles as they are; an assistant's tool_calls (arguments parsed from their JSON text, as
templates expect objects) and a tool message's tool_call_id and name kept. Any malformed message is a 400 on
`messages` saying which one."""
from __future__ import annotations

import json

from server.errors import OpenAIError, bad_request

# A role as the template knows it: developer is OpenAI's newer name for system. Other roles go to the template
# as they are (as vLLM passes them), for templates that know more roles.
TEMPLATE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not messages:
        raise bad_request("messages must be a non-empty array", param="messages")
    return [_chat_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def _chat_message(message: object, where: str) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
        raise _malformed(f"{where} must be an object with a role (such as {', '.join(TEMPLATE_ROLES)})")
    role = message["role"]
    tool_calls = message.get("tool_calls") if role == "assistant" else None
    content = _content(message.get("content"), where, optional=role == "assistant")
    parsed = {"role": TEMPLATE_ROLES.get(role, role), "content": content}
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise _malformed(f"{where}.tool_calls must be an array")
        if tool_calls:  # an empty array is no call
            parsed["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(tool_calls)]
    if role == "tool":
        parsed["tool_call_id"] = _string(message.get("tool_call_id"), f"{where}.tool_call_id")
        if message.get("name") is not None:
            parsed["name"] = _string(message["name"], f"{where}.name")
    return parsed


def _content(content: object, where: str, optional: bool) -> str:
    if isinstance(content, list):
        return "".join(_text_part(part, where) for part in content)
    if content is None and optional:
        return ""  # an assistant turn that only called tools
    if not isinstance(content, str):
        raise _malformed(f"{where}.content must be a string or an array of text parts")
    return content


def _text_part(part: object, where: str) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise _malformed(f"{where}.content: only text parts are supported")


def _tool_call(call: object, where: str) -> dict:
    """{"id", "type": "function", "function": {"name", "arguments": JSON text}}."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise _malformed(f'{where} must be an object with type "function" and a function')
    arguments = _string(function.get("arguments"), f"{where}.function.arguments", allow_empty=True)
    try:
        return template_tool_call(_string(call.get("id"), f"{where}.id"),
                                  _string(function.get("name"), f"{where}.function.name"), arguments)
    except ValueError:
        raise _malformed(f"{where}.function.arguments must be JSON text") from None


def template_tool_call(call_id: str, name: str, arguments: str) -> dict:
    """A call as templates take it: its arguments parsed from their JSON text (empty text: none). A ValueError
    when they are no JSON."""
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.loads(arguments) if arguments.strip() else {}}}


def _string(value: object, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or not (value or allow_empty):
        raise _malformed(f"{where} must be a non-empty string" if not allow_empty else f"{where} must be a string")
    return value


def _malformed(message: str) -> OpenAIError:
    return bad_request(message, param="messages")
