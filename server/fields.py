"""Which request fields TokModel honours, refuses or ignores; one check for chat, completions, responses and
tokenize.

Honoured: the fields the protocol parses (protocol.CHAT_FIELDS, ...). Refused: the fields of OpenAI's API and of
vLLM's extra parameters that TokModel does not implement, each with the values that ask for nothing beyond what
TokModel does anyway (null, the default, a no-op such as `functions: []`): those pass, any other value is a 400
"<field> is not supported" on that param, so that no client believes a feature ran that did not. Delete a row
when its feature lands. Any other field is ignored, with one warning per field name in the server log.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

from server.errors import bad_request

logger = logging.getLogger("tokmodel.server")

NoOp = Callable[[object, dict], bool]  # (value, body): whether this value asks for nothing TokModel does not do


def only(*values: object) -> NoOp:
    """Accepts these values (null always passes before a NoOp is asked)."""
    return lambda value, body: any(_same_json(value, v) for v in values)


def _same_json(a: object, b: object) -> bool:
    # True == 1 in Python but not in JSON: `priority: true` is no priority 0.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


# Known, and without effect on what TokModel returns: accepted as they come.
_UNUSED = frozenset({"safety_identifier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                     "metadata",  # OpenAI stores it with a completion (`store: true` is refused); a response repeats it
                     "max_tool_calls"})  # counts calls to OpenAI's built-in tools, which TokModel has none of

_MULTIMODAL = {"mm_processor_kwargs": only({})}
_GENERATION = {  # every endpoint that generates: chat, completions, responses
    "best_of": lambda value, body: _same_json(value, body.get("n") or 1),  # one candidate per choice is the default
    "logits_processors": only([]),
    "structural_tag": only(), "guided_decoding_backend": only(), "guided_whitespace_pattern": only(),
    "priority": only(0), "request_id": only(), "cache_salt": only(), "kv_transfer_params": only(),
    "vllm_xargs": only({}), "store": only(False), "service_tier": only("auto", "default"),
}
# vLLM's extra sampling and output parameters: honoured on chat and completions, not (yet) on Responses.
_VLLM_EXTRAS = {
    "include_stop_str_in_output": only(False), "spaces_between_special_tokens": only(True),
    "truncate_prompt_tokens": only(), "prompt_logprobs": only(), "allowed_token_ids": only(), "bad_words": only([]),
    "return_tokens_as_token_ids": only(False), "return_token_ids": only(False),
}
CHAT_REFUSED: dict[str, NoOp] = _GENERATION | _MULTIMODAL | {
    "functions": only([]), "function_call": only("none", "auto"),  # deprecated for tools and tool_choice
    "audio": only(), "modalities": only(["text"]), "prediction": only(), "web_search_options": only(),
    "moderation": only(), "reasoning_effort": only("none"), "verbosity": only("medium"),
    "include_reasoning": only(True), "add_special_tokens": only(False), "documents": only([]),
    "media_io_kwargs": only({}),
}
COMPLETION_REFUSED: dict[str, NoOp] = _GENERATION | {
    "suffix": only(""), "add_special_tokens": only(True), "prompt_embeds": only(),
}
RESPONSES_REFUSED: dict[str, NoOp] = _GENERATION | _VLLM_EXTRAS | {
    "n": only(1),  # a response has one output
    "use_beam_search": only(False), "length_penalty": only(1),
    "max_tokens": only(),  # chat's name: here max_output_tokens
    # On Responses, the output's format is text.format.
    "response_format": only(), "structured_outputs": only(), "guided_json": only(), "guided_regex": only(),
    "guided_choice": only(), "guided_grammar": only(),
    "include": only([]), "top_logprobs": only(0), "reasoning": only({}, {"effort": "none"}),
    "truncation": only("disabled"), "background": only(False), "background_options": only({}),
    "conversation": only(), "prompt": only(), "context_management": only([]), "moderation": only(),
    "image": only({}), "access_programs": only({}),
}
TOKENIZE_REFUSED: dict[str, NoOp] = _MULTIMODAL

_MAX_LOGGED_NAMES = 1000  # a client inventing a name per request must not grow the log, or this set, forever
_logged_names: set[str] = set()  # per process, as the log it deduplicates


def check_fields(body: dict, honoured: Collection[str], refused: Mapping[str, NoOp]) -> None:
    """A 400 naming the first field that asks for something TokModel does not do; unknown fields are logged."""
    for name, value in body.items():
        if name in honoured or name in _UNUSED:
            continue
        if name not in refused:
            _log_ignored(name)
        elif value is not None and not refused[name](value, body):
            raise bad_request(f"{name} is not supported", param=name)


def _log_ignored(name: str) -> None:
    name = name[:100]
    if name in _logged_names or len(_logged_names) >= _MAX_LOGGED_NAMES:
        return
    _logged_names.add(name)
    logger.warning("ignoring the unknown request field %r (logged once per field name)", name)
