"""Request parsing and validation: JSON bodies to engine inputs, every mistake a 400 naming its parameter."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from jinja2 import TemplateError

from engine.chat_template import ChatTemplateOptions
from engine.sampling_params import RequestOutputKind, SamplingParams, check_token_ids
from engine.structured_output import StructuredOutputsParams
from server.errors import OpenAIError, bad_request
from server.structured_outputs import FIELDS as STRUCTURED_OUTPUT_FIELDS
from server.structured_outputs import structured_outputs

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM
    from server.state import ServerState

# JSON types a field may take; None (JSON null) is always accepted and means "the default".
_NUMBER = (int, float)
_SAMPLING_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "n": (int,), "temperature": _NUMBER, "top_p": _NUMBER, "top_k": (int,), "min_p": _NUMBER,
    "seed": (int,), "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER, "repetition_penalty": _NUMBER,
    "logit_bias": (dict,), "max_tokens": (int,), "min_tokens": (int,), "stop": (str, list), "stop_token_ids": (list,),
    "ignore_eos": (bool,), "skip_special_tokens": (bool,), "stream": (bool,), "stream_options": (dict,), "user": (str,),
    "use_beam_search": (bool,), "length_penalty": _NUMBER,  # server/beam_search.py
    # vLLM's extra parameters
    "prompt_logprobs": (int,), "allowed_token_ids": (list,), "bad_words": (list,), "include_stop_str_in_output": (bool,),
    "spaces_between_special_tokens": (bool,), "truncate_prompt_tokens": (int,), "return_token_ids": (bool,),
    "return_tokens_as_token_ids": (bool,),
}
_SAMPLING_FIELDS |= STRUCTURED_OUTPUT_FIELDS
# The chat template fields of chat requests and /tokenize (vLLM's extra parameters).
CHAT_TEMPLATE_FIELDS = {"add_generation_prompt": (bool,), "continue_final_message": (bool,), "chat_template": (str,),
                        "chat_template_kwargs": (dict,)}
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages": (list,), "max_completion_tokens": (int,), "logprobs": (bool,),
                                  "top_logprobs": (int,), "tools": (list,), "tool_choice": (str, dict),
                                  "parallel_tool_calls": (bool,), "echo": (bool,)} | CHAT_TEMPLATE_FIELDS
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt": (str, list), "echo": (bool,), "logprobs": (int,)}
# SamplingParams copies these request fields under the same name.
_PASSTHROUGH = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "logit_bias", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                "skip_special_tokens", "prompt_logprobs", "allowed_token_ids", "bad_words", "include_stop_str_in_output",
                "spaces_between_special_tokens", "truncate_prompt_tokens")
# Arrays and objects within each other: far more than any request needs (a tool's JSON schema included), few
# enough that nothing after parsing (templates, schema checks) can recurse too deep.
MAX_BODY_DEPTH = 64
_TOO_DEEP = f"request body is nested too deeply (more than {MAX_BODY_DEPTH} levels of arrays and objects)"
_CONTAINERS = (dict, list)  # exactly the types json.loads builds for objects and arrays


@dataclass
class StreamOptions:
    stream: bool
    include_usage: bool
    continuous_usage_stats: bool = False  # usage on every chunk too (vLLM's), with include_usage


async def read_json(request: web.Request) -> dict:
    """The body as a JSON object; aiohttp raises 413 itself when it is over client_max_size. NaN, Infinity and
    numbers beyond a float (1e400) are refused, as is nesting deeper than MAX_BODY_DEPTH."""
    raw = await request.read()
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:  # deeper than the parser's own stack allows
        raise bad_request(_TOO_DEEP) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    except ValueError:  # an integer past Python's digit limit for int()
        raise bad_request("request body holds a number with too many digits") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    if _nested_deeper_than(body, raw, MAX_BODY_DEPTH):
        raise bad_request(_TOO_DEEP)
    return body


def _refuse_constant(name: str) -> float:
    raise bad_request(f"request body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise bad_request(f"request body holds a number out of range: {text[:32]}")
    return value


def _nested_deeper_than(body: dict, raw: bytes, limit: int) -> bool:
    """Level by level, without recursion. A body with no more brackets than the limit is not even walked, so a
    big flat one (a long token-id prompt) costs one count of its bytes."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    level: list = [body]
    for _ in range(limit):
        level = [child for container in level
                 for child in (container.values() if type(container) is dict else container)
                 if type(child) in _CONTAINERS]
        if not level:
            return False
    return True


def check_types(body: dict, fields: dict[str, tuple[type, ...]]) -> None:
    for name, types in fields.items():
        value = body.get(name)
        # bool is an int in Python but not in JSON: true is no valid max_tokens.
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            names = " or ".join(_JSON_NAMES[t] for t in types)
            raise bad_request(f"{name} must be {names}, got {json.dumps(value)[:64]}", param=name)


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object"}


def check_model(body: dict, served_name: str) -> None:
    model = body.get("model")
    if model is not None and model != served_name:
        raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def stream_options(body: dict) -> StreamOptions:
    options = body.get("stream_options") or {}
    stream = bool(body.get("stream"))
    if options and not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    flags = [options.get(name, False) for name in ("include_usage", "continuous_usage_stats")]
    for name, flag in zip(("include_usage", "continuous_usage_stats"), flags):
        if not isinstance(flag, bool):
            raise bad_request(f"stream_options.{name} must be a boolean, got {json.dumps(flag)[:64]}",
                              param="stream_options")
    if stream and body.get("prompt_logprobs") is not None:
        raise bad_request("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
    return StreamOptions(stream, flags[0], flags[0] and flags[1])


def sampling_params(body: dict, max_tokens: int | None, logprobs: int | None, vocab_size: int | None,
                    param_names: dict[str, str] | None = None,
                    constraint: StructuredOutputsParams | None = None) -> SamplingParams:
    """SamplingParams from the request, its token ids and top_k checked against the vocabulary when there is a
    tokenizer (the engine checks again, but only a check here gives the 400 its param). A ValueError
    ('<field> must ...') becomes a 400 on that field, renamed through param_names where the request calls it
    otherwise (chat's top_logprobs). constraint: a grammar the request implies otherwise (its tool_choice)."""
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad_request(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    kwargs = {name: body[name] for name in _PASSTHROUGH if body.get(name) is not None}
    try:
        params = SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs, output_kind=RequestOutputKind.DELTA,
                                structured_outputs=constraint or structured_outputs(body))
        if vocab_size is not None:
            params.check_vocab(vocab_size)
        return params
    except ValueError as e:
        field, rest = str(e).split(" ", 1)
        param = (param_names or {}).get(field, field)
        raise bad_request(f"{param} {rest}", param=param if param in body else None) from None


def vocab_size(llm: AsyncLLM) -> int | None:
    """The ids a request may name, as the tokenizer knows them; None for a model served without one."""
    return len(llm.tokenizer) if llm.tokenizer is not None else None


def chat_template_options(body: dict, state: ServerState) -> ChatTemplateOptions:
    """The request's rendering options; its own template (chat_template, or one in chat_template_kwargs) only when
    the server trusts request templates (--trust-request-chat-template, as vLLM), else the server's or the model's."""
    kwargs = body.get("chat_template_kwargs") or {}
    template = body.get("chat_template") or kwargs.get("chat_template")
    if template is not None and not state.trust_request_chat_template:
        param = "chat_template" if body.get("chat_template") else "chat_template_kwargs"
        raise bad_request("the request brings its own chat template, but the server does not trust request templates "
                          "(start it with --trust-request-chat-template)", param=param)
    kwargs = {name: value for name, value in kwargs.items() if name != "chat_template"}
    try:
        return ChatTemplateOptions(body.get("add_generation_prompt", True), body.get("continue_final_message", False),
                                   template or state.chat_template, kwargs)
    except ValueError as e:
        param = "chat_template_kwargs" if str(e).startswith("chat_template_kwargs") else "continue_final_message"
        raise bad_request(str(e), param=param) from None


async def chat_prompt(llm: AsyncLLM, messages: list[dict], tools: list[dict] | None = None, param: str = "messages",
                      options: ChatTemplateOptions = ChatTemplateOptions()) -> list[int]:
    """Messages as templates take them (server/chat_messages.py) and tools (OpenAI's function tools) through the
    model's chat template, as token ids. A template that refuses the messages (say, roles that do not alternate,
    or a last message it cannot continue) raises with a message written for the user: a 400 on param."""
    try:
        return await llm.apply_chat_template(messages, tools, options)
    except TemplateError as e:
        raise bad_request(f"the chat template refused the messages: {e}", param=param) from None
    except ValueError as e:  # transformers: continue_final_message on a message the template does not end with
        raise bad_request(f"the chat template could not render the messages: {e}", param=param) from None


def completion_prompts(body: dict, vocab_size: int | None) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists, as a list of prompts."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (prompt and all(map(is_token_id, prompt))):
        prompt = [prompt]
    if not prompt or not (all(isinstance(p, str) for p in prompt) or all(_is_token_list(p) for p in prompt)):
        raise bad_request("prompt must be a string, an array of strings, an array of token ids "
                          "or an array of such arrays", param="prompt")
    try:
        for ids in prompt:
            if vocab_size is not None and isinstance(ids, list):
                check_token_ids("prompt", ids, vocab_size)
    except ValueError as e:
        raise bad_request(str(e), param="prompt") from None
    return prompt


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(map(is_token_id, value))


def is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def require_tokenizer(llm: AsyncLLM) -> None:
    if llm.tokenizer is None:
        raise bad_request("this model has no tokenizer: send the prompt as token ids to /v1/completions")
