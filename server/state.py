"""What every handler needs from the running server, stored on the aiohttp app."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM


@dataclass
class ServerState:
    llm: AsyncLLM
    metrics: ServerMetrics
    api_key: str | None = None
    max_waiting_requests: int = 1024
    draining: bool = False  # set by SIGTERM: requests on kept-alive connections get 503 from then on
    in_flight: set[asyncio.Task] = field(default_factory=set)  # handler tasks, cancelled when a drain runs out


STATE = web.AppKey("state", ServerState)
