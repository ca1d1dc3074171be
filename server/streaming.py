"""Server-sent events as OpenAI streams them. Chat and text completions send `data: {json}` events, then
`data: [DONE]`; the Responses API names each event (server/response_builder.py frames its own)."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

from aiohttp import web

from server.errors import OpenAIError, error_body

logger = logging.getLogger("tokmodel.server")


def sse_event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class EventFraming:
    """How chat and text completions frame a stream: each chunk as `data: {json}`, a failure as OpenAI's error
    body, and `data: [DONE]` last."""

    end = b"data: [DONE]\n\n"

    def event(self, data: dict) -> bytes:
        return sse_event(data)

    def error(self, error: OpenAIError) -> bytes:
        return sse_event(error_body(error.status, error.message, error.param, error.code))


_COMPLETIONS_FRAMING = EventFraming()


async def stream_events(request: web.Request, chunks: AsyncGenerator[list[dict], None],
                        framing: EventFraming = _COMPLETIONS_FRAMING) -> web.StreamResponse:
    """Streams each batch of chunks in one write. The first batch is awaited before the headers go out, so
    that a request the engine refuses still gets its JSON error and status; later errors become an error event.
    The chunk generator is closed on every exit (a disconnect included), which aborts the engine request."""
    async with aclosing(chunks):
        first = await anext(chunks, [])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            await response.write(b"".join(map(framing.event, first)))
            async for batch in chunks:
                if batch:
                    await response.write(b"".join(map(framing.event, batch)))
        except OpenAIError as e:
            await response.write(framing.error(e))
        except ConnectionResetError:
            raise  # the client is gone: nothing more to send
        except Exception:  # the headers are out: the client learns of the failure from an error event
            logger.exception("stream %s failed", request.path)
            await response.write(framing.error(OpenAIError(500, "internal server error")))
        if framing.end:
            await response.write(framing.end)
    await response.write_eof()
    return response
