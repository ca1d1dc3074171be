"""One line per request: the access log of every HTTP request (on unless --disable-uvicorn-access-log) and, with
--enable-log-requests, the details of each engine request as it ends."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams
    from server.metrics import RequestTracker

access_logger = logging.getLogger("tokmodel.access")
_requests_logger = logging.getLogger("tokmodel.requests")


class AccessLogger(AbstractAccessLogger):
    """`127.0.0.1:51234 "POST /v1/chat/completions" 200 812.4 ms`; a stream's latency runs to its last event."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = f"{peer[0]}:{peer[1]}" if peer else request.remote
        self.logger.info('%s "%s %s" %d %.1f ms', client, request.method, request.path_qs, response.status,
                         time * 1000)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def log_request(request_id: str, params: SamplingParams, tracker: RequestTracker) -> None:
    """Choices that never finished (the client went away, the request failed) show finish_reason none."""
    reasons = ",".join(tracker.finish_reasons.get(index, "none") for index in range(params.n))
    _requests_logger.info("Finished request %s: prompt_tokens=%d, completion_tokens=%d, finish_reason=%s, params: %r",
                          request_id, tracker.num_prompt_tokens, tracker.num_tokens, reasons, params)
