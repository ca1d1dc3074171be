"""GET /v1/models, /v1/models/{model}, /health (and SageMaker's /ping), /load, /version, /metrics."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from server.protocol import check_model
from server.state import STATE
from server.version import package_version

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM

_STARTED = int(time.time())


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(request.app[STATE].llm)]})


async def retrieve_model(request: web.Request) -> web.Response:
    llm = request.app[STATE].llm
    check_model(request.match_info, llm.model_name)  # the served model, or a 404 as for any request naming another
    return web.json_response(_model(llm))


def _model(llm: AsyncLLM) -> dict:
    return {"id": llm.model_name, "object": "model", "created": _STARTED, "owned_by": "tokmodel",
            "max_model_len": llm.max_model_len}


async def health(request: web.Request) -> web.Response:
    """200 once the model is loaded (the server listens only then); 503 while draining or once the engine died."""
    state = request.app[STATE]
    return web.Response(status=503 if state.draining or state.llm.errored else 200)


async def ping(request: web.Request) -> web.Response:
    return await health(request)


async def load(request: web.Request) -> web.Response:
    """vLLM's {"server_load": N}: generation requests in flight; 0 without --enable-server-load-tracking."""
    return web.json_response({"server_load": request.app[STATE].server_load or 0})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": package_version()})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
