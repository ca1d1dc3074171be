"""The aiohttp application: routes, OpenAI-shaped errors, API-key check, body limit. server/lifecycle.py serves it."""
from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from server import info, tokenization
from server.chat import create_batch_chat_completion, create_chat_completion
from server.completions import create_completion
from server.errors import OpenAIError, bad_request, error_response
from server.metrics import ServerMetrics
from server.profiling import add_profiler_routes
from server.protocol import read_json
from server.response_store import DEFAULT_MAX_STORED_RESPONSES, ResponseStore
from server.responses import create_response, delete_response, retrieve_response
from server.state import STATE, ServerState
from server.tool_parsers import TOOL_PARSERS

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM

logger = logging.getLogger("tokmodel.server")
MAX_BODY_BYTES = 16 * 1024 * 1024  # far above any prompt that fits a context; a larger body is a 413
_OPEN_PATHS = ("/health", "/ping", "/load", "/version", "/metrics")  # probes and scrapers carry no API key
# What GET /load counts: the routes that run the model (vLLM's load_aware_call).
_LOAD_PATHS = frozenset({"/v1/chat/completions", "/v1/chat/completions/batch", "/v1/completions", "/v1/responses",
                         "/invocations"})


@dataclass
class ServerOptions:
    """The server's settings, each from its `tokmodel serve` flag."""
    api_key: str | None = None
    max_waiting_requests: int = 1024
    shutdown_grace_s: float = 30.0
    access_log: bool = True  # off with --disable-uvicorn-access-log
    log_requests: bool = False  # --enable-log-requests
    stats_interval_s: float = 10.0  # how often a busy server logs its stats line
    tool_call_parser: str | None = None  # with --enable-auto-tool-choice: a name in tool_parsers.TOOL_PARSERS
    max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES  # --max-stored-responses
    profiler_dir: str | None = None  # --profiler-config's torch_profiler_dir: serves /start_profile, /stop_profile
    chat_template: str | None = None  # --chat-template, the template's text
    trust_request_chat_template: bool = False  # --trust-request-chat-template
    enable_server_load_tracking: bool = False  # --enable-server-load-tracking: GET /load counts requests
    enable_tokenizer_info_endpoint: bool = False  # --enable-tokenizer-info-endpoint: GET /tokenizer_info


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as {"error": {...}}; an unexpected one is logged and answered 500, the server stays up."""
    try:
        return await handler(request)
    except OpenAIError as e:
        return error_response(e)
    except web.HTTPException as e:  # aiohttp's own 404, 405, 413
        if e.status < 400:
            raise
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        detail = e.text if e.status == 413 else e.reason  # 413's text says both sizes
        return error_response(OpenAIError(e.status, f"{request.method} {request.path}: {detail}", headers=headers))
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away: nothing to answer
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(OpenAIError(500, "internal server error"))


@web.middleware
async def track_in_flight(request: web.Request, handler) -> web.StreamResponse:
    """Remembers each handler's task, so that a drain can wait for them (and, as a last resort, cancel them)."""
    in_flight = request.app[STATE].in_flight
    task = asyncio.current_task()
    in_flight.add(task)
    try:
        return await handler(request)
    finally:
        in_flight.discard(task)


@web.middleware
async def track_server_load(request: web.Request, handler) -> web.StreamResponse:
    """With --enable-server-load-tracking, counts the generation requests in flight (streams until their end)."""
    state = request.app[STATE]
    if state.server_load is None or request.path not in _LOAD_PATHS:
        return await handler(request)
    state.server_load += 1
    try:
        return await handler(request)
    finally:
        state.server_load -= 1


@web.middleware
async def check_api_key(request: web.Request, handler) -> web.StreamResponse:
    api_key = request.app[STATE].api_key
    if api_key and request.path not in _OPEN_PATHS:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
            raise OpenAIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key")
    return await handler(request)


async def invocations(request: web.Request) -> web.StreamResponse:
    """SageMaker's single route: a chat request (messages) or a completion request (prompt), as vLLM's."""
    body = await read_json(request)  # aiohttp keeps the bytes: the handler reads them again
    if "messages" in body:
        return await create_chat_completion(request)
    if "prompt" in body:
        return await create_completion(request)
    raise bad_request("/invocations takes a chat completion request (with messages) or a completion request "
                      "(with prompt)")


def build_app(llm: AsyncLLM, options: ServerOptions) -> web.Application:
    app = web.Application(middlewares=[track_in_flight, openai_errors, check_api_key, track_server_load],
                          client_max_size=MAX_BODY_BYTES)
    tool_parser = TOOL_PARSERS[options.tool_call_parser] if options.tool_call_parser else None
    app[STATE] = ServerState(llm, ServerMetrics(llm), options.api_key, options.max_waiting_requests,
                             options.log_requests, responses=ResponseStore(options.max_stored_responses),
                             tool_parser=tool_parser, chat_template=options.chat_template,
                             trust_request_chat_template=options.trust_request_chat_template,
                             server_load=0 if options.enable_server_load_tracking else None)
    app.router.add_post("/v1/chat/completions", create_chat_completion)
    app.router.add_post("/v1/chat/completions/batch", create_batch_chat_completion)
    app.router.add_post("/v1/completions", create_completion)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", retrieve_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_get("/v1/models", info.list_models)
    app.router.add_get("/v1/models/{model:.+}", info.retrieve_model)  # served names may hold a slash (org/name)
    app.router.add_get("/health", info.health)
    app.router.add_route("*", "/ping", info.ping)  # SageMaker's health check (GET and POST)
    app.router.add_post("/invocations", invocations)
    app.router.add_get("/load", info.load)
    app.router.add_get("/version", info.version)
    app.router.add_get("/metrics", info.metrics)
    app.router.add_post("/tokenize", tokenization.tokenize)
    app.router.add_post("/detokenize", tokenization.detokenize)
    if options.profiler_dir:
        add_profiler_routes(app, options.profiler_dir)
    if options.enable_tokenizer_info_endpoint:
        app.router.add_get("/tokenizer_info", tokenization.tokenizer_info)
    return app
