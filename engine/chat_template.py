"""A model's chat template with tools: messages (assistant tool_calls and tool results included) and tool
definitions go to the template as transformers takes them (`tools=`), or, for a template that ignores tools, are
written into the messages in the Hermes format (hermes_tool_prompt.py)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.hermes_tool_prompt import hermes_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_PROBE_MESSAGES = [{"role": "user", "content": "?"}]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe", "description": "A probe.",
                                                  "parameters": {"type": "object", "properties": {}}}}]
# What the renderer itself sets: chat_template_kwargs may not.
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "tokenize",
                                      "return_dict", "add_generation_prompt", "continue_final_message",
                                      "tokenizer_kwargs", "return_tensors", "padding", "truncation", "max_length",
                                      "return_assistant_tokens_mask"})


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How to render, as vLLM's chat request fields of the same names."""
    add_generation_prompt: bool = True  # end with the opening of the assistant's turn
    continue_final_message: bool = False  # end inside the last message, for the model to go on with it
    chat_template: str | None = None  # a Jinja template instead of the tokenizer's
    chat_template_kwargs: dict = field(default_factory=dict)  # more variables for the template

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message cannot be true with add_generation_prompt true")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs))
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {reserved[0]!r}")


class ChatTemplate:
    """Renders through one tokenizer; use it from the thread that owns that tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def supports_tools(self, chat_template: str | None = None) -> bool:
        """A template that ignores tools renders the same text with them as without."""
        return _supports_tools(self.tokenizer, chat_template)

    def token_ids(self, messages: list[dict], tools: list[dict] | None = None,
                  options: ChatTemplateOptions = ChatTemplateOptions()) -> list[int]:
        """tools: OpenAI's function tools ({"type": "function", "function": {...}}); a tool call's arguments in
        messages are objects, as templates expect them. A template that cannot continue the final message
        raises ValueError."""
        if _uses_tools(messages, tools) and not self.supports_tools(options.chat_template):
            messages, tools = hermes_messages(messages, tools), None
        return _render(self.tokenizer, messages, tools, options)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None,
            options: ChatTemplateOptions, tokenize: bool = True) -> list[int] | str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=options.chat_template,
                                         add_generation_prompt=options.add_generation_prompt,
                                         continue_final_message=options.continue_final_message,
                                         tokenize=tokenize, return_dict=False, **options.chat_template_kwargs)


@functools.lru_cache(maxsize=32)  # per tokenizer and template: requests may bring their own templates
def _supports_tools(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> bool:
    options = ChatTemplateOptions(chat_template=chat_template)
    return (_render(tokenizer, _PROBE_MESSAGES, _PROBE_TOOLS, options, tokenize=False)
            != _render(tokenizer, _PROBE_MESSAGES, None, options, tokenize=False))


def _uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(message["role"] == "tool" or message.get("tool_calls") for message in messages)
