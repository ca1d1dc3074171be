"""The one path from a handler to the engine: admission, aborts on disconnect, metrics, and fan-in of prompts."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from engine.beam_search import BeamSearchParams
from engine.errors import EngineDeadError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.errors import OpenAIError, bad_request
from server.request_logs import log_request
from server.state import ServerState

_RETRY_AFTER_S = "1"


def _engine_dead() -> OpenAIError:
    return OpenAIError(503, "the engine stopped after an unrecoverable error; the server is exiting",
                       code="engine_dead")


def admit(state: ServerState) -> None:
    """Refuse work before it queues: once the engine died, while draining, or while the waiting queue is over
    its limit."""
    if state.llm.errored:
        raise _engine_dead()
    if state.draining:
        raise OpenAIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": _RETRY_AFTER_S})
    if state.llm.num_waiting_requests >= state.max_waiting_requests:
        raise OpenAIError(429, f"the server has {state.max_waiting_requests} requests waiting; retry later",
                          code="queue_full", headers={"Retry-After": _RETRY_AFTER_S})


async def generate(state: ServerState, prompt: str | list[int], params: SamplingParams, request_id: str,
                   beam: BeamSearchParams | None = None) -> AsyncIterator[RequestOutput]:
    """The engine's DELTA outputs for one prompt (a beam search: its one final output). Closing this generator
    (the handler's task cancelled on disconnect, or an exception) closes the engine's, which aborts the request
    and frees its blocks."""
    tracker = state.metrics.track(params)
    engine_outputs = state.llm.generate(prompt, params, request_id) if beam is None else _beam_search(
        state, prompt, beam, request_id)
    try:
        async with aclosing(engine_outputs) as outputs:
            async for out in outputs:
                tracker.observe(out)
                reasons = {choice.finish_reason for choice in out.outputs}
                if "abort" in reasons:
                    raise OpenAIError(503, "the request was aborted by the server", code="aborted")
                if "error" in reasons:  # the engine logged why; the other requests went on
                    raise OpenAIError(500, "the engine failed to process this request", code="internal_error")
                yield out
    except ValueError as e:  # the engine refuses requests that can never run, before the first output
        tracker.refused()
        raise bad_request(str(e)) from None
    except EngineDeadError:
        raise _engine_dead() from None
    finally:
        tracker.close()
        if state.log_requests:
            log_request(request_id, params, tracker)


async def _beam_search(state: ServerState, prompt: str | list[int], params: BeamSearchParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
    yield await state.llm.beam_search(prompt, params, request_id)


async def generate_many(state: ServerState, prompts: list[str | list[int]], params: SamplingParams,
                        request_id: str, beam: BeamSearchParams | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all prompts as they come; one prompt needs no tasks."""
    admit(state)
    if len(prompts) == 1:
        async with aclosing(generate(state, prompts[0], params, request_id, beam)) as outputs:
            async for out in outputs:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.create_task(_pump(queue, i, generate(state, p, params, f"{request_id}-{i}", beam)))
             for i, p in enumerate(prompts)]
    try:
        for _ in range(len(pumps)):
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for pump in pumps:
            pump.cancel()  # closes the engine streams of the prompts still running
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(queue: asyncio.Queue, index: int, outputs: AsyncIterator[RequestOutput]) -> None:
    try:
        async with aclosing(outputs):
            async for out in outputs:
                queue.put_nowait((index, out))
    except Exception as e:
        queue.put_nowait(e)
    queue.put_nowait(None)  # this prompt is done
