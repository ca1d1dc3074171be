"""Tool parsers on canned model outputs: a whole output and the same output streamed, split at every character
boundary and one character at a time, give the same content and calls; a streamed call starts with its index,
id and name, then only argument fragments; text that could still become a call is never streamed as content.
Also the schema tool_choice "required" is enforced with, and the request adjustment of parsers whose markers are
special tokens."""
from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from engine import SamplingParams
from server.tool_parsers import (TOOL_PARSERS, DeltaMessage, NamedToolParser, RequiredToolParser, ToolParser,
                                 extract_tool_calls, required_calls_schema)
from server.tools import ToolCalling

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"x": "}]\\""}]}}'
CASES = {  # (parser factory, output, expected content, expected [(name, arguments)])
    "hermes": (TOOL_PARSERS["hermes"],
               f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n"
               '{"arguments": {}, "name": "now"}\n</tool_call>\n',
               "Let me check.", [("get_weather", {"city": "Paris", "days": [1, {"x": '}]"'}]}), ("now", {})]),
    "hermes_text": (TOOL_PARSERS["hermes"], "a <b> and <tool is not a call\n", "a <b> and <tool is not a call\n", []),
    "hermes_no_arguments": (TOOL_PARSERS["hermes"], '<tool_call>{"name": "now"}</tool_call>', None, [("now", {})]),
    "llama3_json": (TOOL_PARSERS["llama3_json"],
                    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "now", '
                    '"parameters": {}}', None, [("get_weather", {"city": "Paris"}), ("now", {})]),
    "llama3_json_bare": (TOOL_PARSERS["llama3_json"], ' {"name": "now", "parameters": {"tz": "UTC"}}', None,
                         [("now", {"tz": "UTC"})]),
    "llama3_json_text": (TOOL_PARSERS["llama3_json"], "It is {sunny} today.", "It is {sunny} today.", []),
    "mistral": (TOOL_PARSERS["mistral"],
                'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "now", "arguments": {"tz": "UTC"}}]', "Sure.",
                [("get_weather", {"city": "Paris"}), ("now", {"tz": "UTC"})]),
    "required": (RequiredToolParser, '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                 '{"name": "now", "parameters": {}}]', None, [("get_weather", {"city": "Paris"}), ("now", {})]),
    "named": (lambda: NamedToolParser("get_weather"), '{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
}


def reassemble(deltas: list[DeltaMessage]) -> tuple[str, list[tuple[str, dict]]]:
    """Content and calls from streamed deltas, checking the order OpenAI streams them in."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.content
        for call in delta.tool_calls:
            if call.index not in calls:
                assert call.id.startswith("call_") and call.name, "a call starts with its id and name"
                assert call.index == len(calls), "calls are numbered in order"
                calls[call.index] = [call.name, ""]
            else:
                assert call.id is None and call.name is None, "later pieces carry only arguments"
            calls[call.index][1] += call.arguments
    return content, [(name, json.loads(arguments)) for name, arguments in calls.values()]


def streamed(parser: ToolParser, pieces: list[str]) -> list[DeltaMessage]:
    return [parser.feed(piece, final=i == len(pieces) - 1) for i, piece in enumerate(pieces)]


@pytest.mark.parametrize("case", CASES)
def test_a_whole_output_gives_its_content_and_calls(case):
    new_parser, text, content, calls = CASES[case]
    extracted = extract_tool_calls(new_parser(), text)
    assert extracted.content == content
    assert [(call.name, json.loads(call.arguments)) for call in extracted.tool_calls] == calls
    assert len({call.id for call in extracted.tool_calls}) == len(calls)


@pytest.mark.parametrize("case", CASES)
def test_streaming_split_at_every_boundary_gives_the_same_content_and_calls(case):
    new_parser, text, content, calls = CASES[case]
    expected = (content or "", calls)
    assert reassemble(streamed(new_parser(), list(text) + [""])) == expected
    for split in range(len(text) + 1):
        assert reassemble(streamed(new_parser(), [text[:split], text[split:]])) == expected, split


def test_the_name_goes_out_once_complete_and_arguments_as_they_come():
    parser = TOOL_PARSERS["hermes"]()
    assert parser.feed("Hi <tool_") == DeltaMessage("Hi")  # the space and the partial marker wait
    assert parser.feed('call>{"name": "get_wea') == DeltaMessage()
    [start] = parser.feed('ther", "arguments": {"ci').tool_calls
    assert (start.index, start.name, start.arguments) == (0, "get_weather", '{"ci')
    [piece] = parser.feed('ty": "Paris"}}</tool_call>').tool_calls
    assert (piece.id, piece.name, piece.arguments) == (None, None, 'ty": "Paris"}')
    assert parser.tools_called


@pytest.mark.parametrize(("new_parser", "text"), [
    (TOOL_PARSERS["hermes"], '<tool_call>{"name": "f", "arguments": {"a": }}</tool_call>'),  # arguments no JSON
    (TOOL_PARSERS["hermes"], '<tool_call>{"name": "f", "arguments": {"a": 1'),  # cut off
    (TOOL_PARSERS["hermes"], "Let me see. <tool_call>\n"),  # cut off before the call
    (TOOL_PARSERS["hermes"], '<tool_call>{"arguments": {"a": 1}}</tool_call>'),  # no name
    (TOOL_PARSERS["mistral"], "[TOOL_CALLS] [1, 2]"),
    (RequiredToolParser, '[{"name": "f", "parameters": {"a": "unfinished'),  # max_tokens ran out
])
def test_an_output_whose_call_does_not_parse_is_all_content(new_parser, text):
    extracted = extract_tool_calls(new_parser(), text)
    assert extracted.content == text and extracted.tool_calls == []


CITY = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_the_required_schema_allows_calls_of_the_listed_tools_only_with_valid_arguments():
    tools = [("get_weather", {"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}},
                              "required": ["city"], "$defs": {"City": CITY}}),
             ("now", None)]
    schema = required_calls_schema(tools, parallel_tool_calls=True)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": {"name": "Paris"}}},
                         {"name": "now", "parameters": {}}], schema)
    for invalid in ([], [{"name": "other", "parameters": {}}], [{"name": "get_weather", "parameters": {"city": 1}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(invalid, schema)
    one = required_calls_schema(tools, parallel_tool_calls=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "parameters": {}}] * 2, one)


def test_two_tools_defining_one_name_differently_cannot_be_required_together():
    tools = [(name, {"type": "object", "$defs": {"City": schema}}) for name, schema in (("a", CITY), ("b", {}))]
    with pytest.raises(ValueError, match="City"):
        required_calls_schema(tools, parallel_tool_calls=True)


@pytest.mark.parametrize(("parser", "keeps_special_tokens"), [("mistral", True), ("hermes", False)])
def test_a_parser_whose_marker_is_a_special_token_gets_special_tokens_kept(tokenizer, parser, keeps_special_tokens):
    """Else detokenization would drop the marker before the parser could see it (vLLM adjusts requests alike)."""
    mistral_like = copy.deepcopy(tokenizer)
    mistral_like.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    params = SamplingParams()
    ToolCalling(tool_choice="auto", auto_parser=TOOL_PARSERS[parser]).adjust_request(params, mistral_like)
    assert params.skip_special_tokens is not keeps_special_tokens
