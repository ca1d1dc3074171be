"""GET /v1/models, /health, /version, /metrics."""
from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from server.state import STATE
from server.version import package_version

_STARTED = int(time.time())


async def list_models(request: web.Request) -> web.Response:
    llm = request.app[STATE].llm
    model = {"id": llm.model_name, "object": "model", "created": _STARTED, "owned_by": "tokmodel",
             "max_model_len": llm.max_model_len}
    return web.json_response({"object": "list", "data": [model]})


async def health(request: web.Request) -> web.Response:
    """200 once the model is loaded (the server listens only then); 503 while draining or once the engine died."""
    state = request.app[STATE]
    return web.Response(status=503 if state.draining or state.llm.errored else 200)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": package_version()})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
