"""POST /tokenize and /detokenize, GET /tokenizer_info, with vLLM's request and response shapes."""
from __future__ import annotations

from aiohttp import web
from tokenizers import AddedToken

from server.chat_messages import chat_messages
from server.errors import bad_request
from server.fields import TOKENIZE_REFUSED, NoOp, check_fields
from server.protocol import (CHAT_TEMPLATE_FIELDS, chat_prompt, chat_template_options, check_model, check_types,
                             is_token_id, read_json, require_tokenizer)
from server.state import STATE
from server.tools import CHAT_FORM, function_tools, template_tools

_TOKENIZE_FIELDS = {"model": (str,), "prompt": (str,), "messages": (list,), "add_special_tokens": (bool,),
                    "tools": (list,), "return_token_strs": (bool,)} | CHAT_TEMPLATE_FIELDS
_DETOKENIZE_FIELDS = {"model": (str,), "tokens": (list,)}


async def tokenize(request: web.Request) -> web.Response:
    """A prompt, or messages as chat renders them (the same template options and tools)."""
    state = request.app[STATE]
    llm = state.llm
    body = await _body(request, _TOKENIZE_FIELDS, TOKENIZE_REFUSED)
    if "messages" in body:
        tokens = await chat_prompt(llm, chat_messages(body), template_tools(function_tools(body, CHAT_FORM)),
                                   options=chat_template_options(body, state))
    elif isinstance(body.get("prompt"), str):
        tokens = await llm.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
    else:
        raise bad_request("send a prompt string or a messages array", param="prompt")
    token_strs = llm.tokenizer.convert_ids_to_tokens(tokens) if body.get("return_token_strs") else None
    return web.json_response({"count": len(tokens), "max_model_len": llm.max_model_len, "tokens": list(tokens),
                              "token_strs": token_strs})


async def tokenizer_info(request: web.Request) -> web.Response:
    """vLLM's GET /tokenizer_info: the tokenizer's configuration (its init arguments, without file paths), its
    class, and the chat template the server renders with."""
    state = request.app[STATE]
    require_tokenizer(state.llm)
    tokenizer = state.llm.tokenizer
    config = {name: _json_value(value) for name, value in tokenizer.init_kwargs.items()
              if name not in ("vocab_file", "merges_file")}
    config["tokenizer_class"] = type(tokenizer).__name__
    template = state.chat_template or tokenizer.chat_template
    if template:
        config["chat_template"] = template
    return web.json_response(config)


def _json_value(value: object) -> object:
    """Special tokens as their text; added_tokens_decoder's entries as objects (content, special, ...)."""
    if isinstance(value, AddedToken):
        return value.content
    if isinstance(value, dict):
        return {str(k): v.__getstate__() if isinstance(v, AddedToken) else _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


async def detokenize(request: web.Request) -> web.Response:
    llm = request.app[STATE].llm
    body = await _body(request, _DETOKENIZE_FIELDS, {})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_token_id(t) and t < len(llm.tokenizer) for t in tokens):
        raise bad_request(f"tokens must be an array of token ids below {len(llm.tokenizer)}", param="tokens")
    return web.json_response({"prompt": llm.tokenizer.decode(tokens)})


async def _body(request: web.Request, fields: dict[str, tuple[type, ...]], refused: dict[str, NoOp]) -> dict:
    llm = request.app[STATE].llm
    body = await read_json(request)
    check_fields(body, fields, refused)
    check_types(body, fields)
    check_model(body, llm.model_name)
    require_tokenizer(llm)
    return body
