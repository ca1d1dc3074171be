"""The Hermes tool-calling format, for chat templates that know nothing of tools (SmolLM2's, Llama 2's, ...).

Such a template renders only roles and text, so the tools are written into the messages instead: their definitions
as JSON lines inside <tools></tools> in the system message (appended to the request's own, or a new first one),
each earlier call of an assistant as a <tool_call> block after its text, and tool results as <tool_response>
blocks in a user turn (consecutive results in one turn, so that user and assistant turns still alternate). This is
the format Hermes 2 Pro and Qwen 2.5 were trained on; the `hermes` tool parser reads the calls it asks for.
"""
from __future__ import annotations

import json

_TOOLS_SYSTEM_PROMPT = """# Tools

You may call one or more functions to help with the user's request. Their signatures are inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-json-object>}}
</tool_call>"""


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """messages (tool_calls with arguments as objects) and tools (OpenAI's function tools) as plain text turns."""
    rewritten: list[dict] = []
    previous_role = None
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous_role == "tool":
                rewritten[-1] = {"role": "user", "content": f"{rewritten[-1]['content']}\n{block}"}
            else:
                rewritten.append({"role": "user", "content": block})
        elif message.get("tool_calls"):
            rewritten.append({"role": message["role"], "content": _with_calls(message["content"], message["tool_calls"])})
        else:
            rewritten.append(message)
        previous_role = message["role"]
    return _with_tools(rewritten, tools) if tools else rewritten


def _with_calls(content: str, tool_calls: list[dict]) -> str:
    blocks = [f"<tool_call>\n{json.dumps({'name': call['function']['name'], 'arguments': call['function']['arguments']})}"
              "\n</tool_call>" for call in tool_calls]
    return "\n".join([content, *blocks] if content else blocks)


def _with_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    prompt = _TOOLS_SYSTEM_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in tools))
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
