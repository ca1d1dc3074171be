"""The aiohttp application: routes, OpenAI-shaped errors, API-key check, body limit; and serving it until SIGTERM."""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from server import info, tokenization
from server.chat import create_chat_completion
from server.completions import create_completion
from server.errors import OpenAIError, error_response
from server.metrics import ServerMetrics
from server.state import STATE, ServerState

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM

logger = logging.getLogger("tokmodel.server")
MAX_BODY_BYTES = 16 * 1024 * 1024  # far above any prompt that fits a context; a larger body is a 413
_OPEN_PATHS = ("/health", "/version", "/metrics")  # probes and scrapers carry no API key


@dataclass
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    max_waiting_requests: int = 1024
    shutdown_grace_s: float = 30.0


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
    """Remembers each handler's task, so that a drain past its grace period can cancel (and abort) it."""
    in_flight = request.app[STATE].in_flight
    task = asyncio.current_task()
    in_flight.add(task)
    try:
        return await handler(request)
    finally:
        in_flight.discard(task)


@web.middleware
async def check_api_key(request: web.Request, handler) -> web.StreamResponse:
    api_key = request.app[STATE].api_key
    if api_key and request.path not in _OPEN_PATHS:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
            raise OpenAIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key")
    return await handler(request)


def build_app(llm: AsyncLLM, api_key: str | None = None, max_waiting_requests: int = 1024) -> web.Application:
    app = web.Application(middlewares=[track_in_flight, openai_errors, check_api_key], client_max_size=MAX_BODY_BYTES)
    app[STATE] = ServerState(llm, ServerMetrics(llm, llm.model_name), api_key, max_waiting_requests)
    app.router.add_post("/v1/chat/completions", create_chat_completion)
    app.router.add_post("/v1/completions", create_completion)
    app.router.add_get("/v1/models", info.list_models)
    app.router.add_get("/health", info.health)
    app.router.add_get("/version", info.version)
    app.router.add_get("/metrics", info.metrics)
    app.router.add_post("/tokenize", tokenization.tokenize)
    app.router.add_post("/detokenize", tokenization.detokenize)
    return app


async def serve(llm: AsyncLLM, options: ServerOptions) -> None:
    """Serves until SIGTERM or SIGINT, then drains: stop listening, let in-flight requests finish within
    the grace period, cancel (and so abort) the rest."""
    app = build_app(llm, options.api_key, options.max_waiting_requests)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its engine request.
    # aiohttp's own shutdown waits up to twice its timeout; the grace period is kept by cancel_in_flight below.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=options.shutdown_grace_s + 1,
                           access_log=None)
    await runner.setup()
    await web.TCPSite(runner, options.host, options.port).start()
    print(f"TokModel serving {llm.model_name} on http://{options.host}:{options.port} (device {llm.device}, "
          f"dtype {llm.dtype}, KV cache {llm.num_kv_blocks} blocks x {llm.block_size} tokens, "
          f"max_model_len {llm.max_model_len})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("TokModel draining: no new requests; waiting for those in flight", flush=True)
    state = app[STATE]
    state.draining = True
    loop.call_later(options.shutdown_grace_s, cancel_in_flight, state)
    await runner.cleanup()


def cancel_in_flight(state: ServerState) -> None:
    if state.in_flight:
        print(f"TokModel aborting {len(state.in_flight)} requests still in flight after the grace period", flush=True)
    for task in state.in_flight:
        task.cancel()
