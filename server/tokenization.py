"""POST /tokenize and /detokenize, with vLLM's request and response shapes."""
from __future__ import annotations

from aiohttp import web

from server.chat_messages import chat_messages
from server.errors import bad_request
from server.fields import TOKENIZE_REFUSED, NoOp, check_fields
from server.protocol import chat_prompt, check_model, check_types, is_token_id, read_json, require_tokenizer
from server.state import STATE
from server.tools import CHAT_FORM, function_tools, template_tools

_TOKENIZE_FIELDS = {"model": (str,), "prompt": (str,), "messages": (list,), "add_special_tokens": (bool,),
                    "tools": (list,)}
_DETOKENIZE_FIELDS = {"model": (str,), "tokens": (list,)}


async def tokenize(request: web.Request) -> web.Response:
    llm = request.app[STATE].llm
    body = await _body(request, _TOKENIZE_FIELDS, TOKENIZE_REFUSED)
    if "messages" in body:
        tokens = await chat_prompt(llm, chat_messages(body), template_tools(function_tools(body, CHAT_FORM)))
    elif isinstance(body.get("prompt"), str):
        tokens = await llm.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
    else:
        raise bad_request("send a prompt string or a messages array", param="prompt")
    return web.json_response({"count": len(tokens), "max_model_len": llm.max_model_len, "tokens": list(tokens)})


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
