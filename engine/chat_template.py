"""A model's chat template with tools: messages (assistant tool_calls and tool results included) and tool
definitions go to the template as transformers takes them (`tools=`), or, for a template that ignores tools, are
written into the messages in the Hermes format (hermes_tool_prompt.py)."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from engine.hermes_tool_prompt import hermes_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_PROBE_MESSAGES = [{"role": "user", "content": "?"}]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe", "description": "A probe.",
                                                  "parameters": {"type": "object", "properties": {}}}}]


class ChatTemplate:
    """Renders through one tokenizer; use it from the thread that owns that tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    @functools.cached_property
    def supports_tools(self) -> bool:
        """A template that ignores tools renders the same text with them as without."""
        return self._render(_PROBE_MESSAGES, _PROBE_TOOLS, tokenize=False) != self._render(_PROBE_MESSAGES, None, tokenize=False)

    def token_ids(self, messages: list[dict], tools: list[dict] | None = None,
                  add_generation_prompt: bool = True) -> list[int]:
        """tools: OpenAI's function tools ({"type": "function", "function": {...}}); a tool call's arguments in
        messages are objects, as templates expect them."""
        if _uses_tools(messages, tools) and not self.supports_tools:
            messages, tools = hermes_messages(messages, tools), None
        return self._render(messages, tools, add_generation_prompt=add_generation_prompt)

    def _render(self, messages: list[dict], tools: list[dict] | None, tokenize: bool = True,
                add_generation_prompt: bool = True) -> list[int] | str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize, return_dict=False)


def _uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(message["role"] == "tool" or message.get("tool_calls") for message in messages)
