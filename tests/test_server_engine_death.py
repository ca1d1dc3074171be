"""A dead engine, the server's side: /health and new requests answer 503, requests in flight end with a 503
(an error event and [DONE] in a stream), and serve() exits 1 after logging the cause, so a supervisor restarts it."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from engine import AsyncLLM, EngineConfig, SamplingParams
from engine.errors import EngineDeadError
from server.app import ServerOptions, build_app
from server_fixtures import serving_in_process

CHAT = "/v1/chat/completions"
LONG = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 400, "ignore_eos": True}
CAUSE = "CUDA error: an illegal memory access was encountered"


@pytest.fixture
def llm(model_dir) -> AsyncLLM:
    """An engine of its own: a dead engine stays dead."""
    llm = AsyncLLM(EngineConfig(max_model_len=512, kv_cache_memory_bytes=64 << 20))
    yield llm
    llm.shutdown()


def poison(llm: AsyncLLM) -> None:
    """The engine's next step hits a CUDA error, which it cannot survive."""
    def broken_forward(output, prompt_rows=()):
        raise torch.AcceleratorError(CAUSE)

    llm.core.runner.execute_model = broken_forward


async def kill(llm: AsyncLLM) -> None:
    """Poison the engine and give it a step to die on."""
    poison(llm)
    with pytest.raises(EngineDeadError):
        async for _ in llm.generate("Hello", SamplingParams(max_tokens=1), "the-last-straw"):
            pass


async def wait_running(llm: AsyncLLM, count: int) -> None:
    while llm.get_stats().num_running_reqs < count:
        await asyncio.sleep(0.02)


def test_health_and_new_requests_answer_503_once_the_engine_died(llm):
    async def scenario() -> None:
        async with TestClient(TestServer(build_app(llm, ServerOptions()))) as client:
            assert (await client.get("/health")).status == 200
            await kill(llm)
            assert (await client.get("/health")).status == 503
            response = await client.post(CHAT, json=LONG)
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "engine_dead"

    asyncio.run(scenario())


def test_requests_in_flight_end_with_503_when_the_engine_dies(llm):
    async def scenario() -> None:
        async with TestClient(TestServer(build_app(llm, ServerOptions()))) as client:
            stream = await client.post(CHAT, json=LONG | {"stream": True})
            assert stream.status == 200
            whole = asyncio.ensure_future(client.post(CHAT, json=LONG))
            await wait_running(llm, 2)
            poison(llm)
            events = [line[len(b"data: "):].strip() async for line in stream.content if line.startswith(b"data: ")]
            assert events[-1] == b"[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "engine_dead"
            response = await whole
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "engine_dead"

    asyncio.run(scenario())


def test_serve_exits_1_and_logs_the_cause_when_the_engine_dies(llm, caplog):
    async def scenario() -> int:
        async with serving_in_process(llm, ServerOptions()) as server:
            await kill(llm)
            return await asyncio.wait_for(server.serving, timeout=5)

    caplog.set_level(logging.INFO)
    assert asyncio.run(scenario()) == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert CAUSE in record.getMessage()
