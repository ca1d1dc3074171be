"""Tools and tool history reach the chat template: as given, to a template that renders tools; in the Hermes
format, to one that ignores them (the default model's)."""
from __future__ import annotations

import copy
import json

import pytest

from engine.chat_template import ChatTemplate

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
HISTORY = [{"role": "user", "content": "Weather in Paris and Lyon?"},
           {"role": "assistant", "content": "", "tool_calls": [CALL, CALL | {"id": "call_2"}]},
           {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
           {"role": "tool", "content": "rainy", "tool_call_id": "call_2", "name": "get_weather"}]
# Renders what it is given as JSON lines, so a test can read back exactly what reached it.
ECHO_TEMPLATE = ("{% if tools %}{{ tools | tojson }}\n{% endif %}"
                 "{% for message in messages %}{{ message | tojson }}\n{% endfor %}")


def render(template: ChatTemplate, messages: list[dict], tools: list[dict] | None) -> str:
    return template.tokenizer.decode(template.token_ids(messages, tools))


def test_a_template_that_renders_tools_gets_tools_and_history_as_given(tokenizer):
    echo = copy.deepcopy(tokenizer)
    echo.chat_template = ECHO_TEMPLATE
    template = ChatTemplate(echo)
    assert template.supports_tools()
    tools, *messages = [json.loads(line) for line in render(template, HISTORY, TOOLS).splitlines()]
    assert tools == TOOLS and messages == HISTORY


def test_the_default_models_template_gets_tools_and_history_in_the_hermes_format(tokenizer):
    template = ChatTemplate(tokenizer)
    assert not template.supports_tools(), "SmolLM2's template renders only roles and text"
    prompt = render(template, HISTORY, TOOLS)
    assert f"<tools>\n{json.dumps(TOOLS[0])}\n</tools>" in prompt.split("<|im_end|>")[0], "in the system turn"
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}\n{call}<|im_end|>" in prompt
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in prompt


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_the_hermes_tools_join_the_requests_own_system_message(tokenizer, system):
    messages = ([{"role": "system", "content": system}] if system else []) + HISTORY[:1]
    prompt = render(ChatTemplate(tokenizer), messages, TOOLS)
    assert prompt.count("<|im_start|>system\n") == 1
    assert prompt.startswith(f"<|im_start|>system\n{system}\n\n# Tools" if system else "<|im_start|>system\n# Tools")


def test_without_tools_a_conversation_renders_as_the_template_alone_would(tokenizer):
    messages = HISTORY[:1]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ChatTemplate(tokenizer).token_ids(messages) == expected
