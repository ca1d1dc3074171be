"""Serving the app until it should stop. The first SIGTERM or Ctrl-C drains: the server keeps listening but
answers 503, and waits for the requests in flight up to the grace period; a second signal stops at once. Either
way the engine then aborts what is left, so cut streams still end with an error event and [DONE]. When the engine
dies the server exits 1, as vLLM's does, so that a supervisor restarts it."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import TYPE_CHECKING

from aiohttp import web

from server.app import ServerOptions, build_app
from server.request_logs import AccessLogger, access_logger
from server.state import STATE, ServerState
from server.stats_logger import log_stats

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM

logger = logging.getLogger("tokmodel.server")
EXIT_OK, EXIT_ENGINE_DEAD = 0, 1
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_ENGINE_POLL_S = 0.5  # how often the watchdog looks at llm.errored
_ABORT_WAIT_S = 2.0  # after abort_all, how long handlers get to send their 503s before they are cancelled


class StopRequest:
    """What ends serving: the first signal asks for a drain; a second one, or the engine's death, for a stop now."""

    def __init__(self) -> None:
        self.drain = asyncio.Event()
        self.now = asyncio.Event()
        self.engine_dead = False

    def on_signal(self) -> None:
        (self.now if self.drain.is_set() else self.drain).set()

    def on_engine_death(self) -> None:
        self.engine_dead = True
        self.drain.set()
        self.now.set()


async def serve(llm: AsyncLLM, options: ServerOptions, sock: socket.socket) -> int:
    """Serves on `sock` (bound, not yet listening) until stopped; returns the process's exit code."""
    app = build_app(llm, options)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its engine request.
    # By cleanup every handler has finished or been cancelled, so aiohttp's own wait can be short.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=_ABORT_WAIT_S,
                           access_log_class=AccessLogger, access_log=access_logger if options.access_log else None)
    await runner.setup()
    stop = StopRequest()
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.on_signal)
    watchers = [asyncio.create_task(watch_engine(llm, stop)),
                asyncio.create_task(log_stats(llm, options.stats_interval_s))]
    try:
        await web.SockSite(runner, sock).start()
        logger.info("TokModel serving %s on %s (device %s, dtype %s, KV cache %d blocks x %d tokens, max_model_len %d)",
                    llm.model_name, _url(sock), llm.device, llm.dtype, llm.num_kv_blocks, llm.block_size,
                    llm.max_model_len)
        await stop.drain.wait()
        state = app[STATE]
        state.draining = True
        await drain(state, options.shutdown_grace_s, stop)
        await abort_in_flight(state)
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
        for watcher in watchers:
            watcher.cancel()
        await runner.cleanup()
    exit_code = EXIT_ENGINE_DEAD if stop.engine_dead else EXIT_OK
    logger.info("TokModel stopped (exit code %d)", exit_code)
    return exit_code


async def watch_engine(llm: AsyncLLM, stop: StopRequest) -> None:
    while not llm.errored:
        await asyncio.sleep(_ENGINE_POLL_S)
    logger.error("TokModel engine died (%s: %s); exiting with code %d so that a supervisor can restart the server",
                 type(llm.dead_error).__name__, llm.dead_error, EXIT_ENGINE_DEAD)
    stop.on_engine_death()


async def drain(state: ServerState, grace_s: float, stop: StopRequest) -> None:
    """Waits for the requests in flight until they finish, the grace period runs out, or stop.now is set."""
    if not state.in_flight or stop.now.is_set():
        return
    logger.info("TokModel draining %d requests for up to %g s; press Ctrl-C again to stop now",
                len(state.in_flight), grace_s)
    finished = asyncio.ensure_future(asyncio.wait(list(state.in_flight)))
    interrupted = asyncio.ensure_future(stop.now.wait())
    await asyncio.wait([finished, interrupted], timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
    finished.cancel()
    interrupted.cancel()


async def abort_in_flight(state: ServerState) -> None:
    """The engine aborts what is still running, which each handler answers with a 503 (an error event and [DONE]
    in a stream); handlers that have not finished after _ABORT_WAIT_S are cancelled, as a last resort."""
    if not state.in_flight:
        return
    logger.info("TokModel aborting %d requests still in flight", len(state.in_flight))
    state.llm.abort_all()
    _, stuck = await asyncio.wait(list(state.in_flight), timeout=_ABORT_WAIT_S)
    for task in stuck:
        task.cancel()


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
