"""What every handler needs from the running server, stored on the aiohttp app."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from server.metrics import ServerMetrics
from server.response_store import ResponseStore

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM
    from server.tool_parsers import ToolParser


@dataclass
class ServerState:
    llm: AsyncLLM
    metrics: ServerMetrics
    api_key: str | None = None
    max_waiting_requests: int = 1024
    log_requests: bool = False  # --enable-log-requests: a line per engine request as it ends
    tool_parser: type[ToolParser] | None = None  # reads tool_choice "auto" calls; None: "auto" is refused
    draining: bool = False  # set by the first SIGTERM or Ctrl-C: /health and new requests get 503 from then on
    in_flight: set[asyncio.Task] = field(default_factory=set)  # handler tasks: a drain waits for them
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses created with store: true
    chat_template: str | None = None  # --chat-template: instead of the model's
    trust_request_chat_template: bool = False  # --trust-request-chat-template: requests may bring their own
    server_load: int | None = None  # with --enable-server-load-tracking: generation requests in flight (GET /load)


STATE = web.AppKey("state", ServerState)
