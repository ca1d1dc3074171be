"""What the server logs: an access-log line per HTTP request (unless disabled), a line per engine request with
--enable-log-requests, and while busy a stats line per interval."""
from __future__ import annotations

import asyncio
import logging
import re

import pytest

from engine import AsyncLLM
from engine.metrics import EngineStats
from server.app import ServerOptions
from server.stats_logger import stats_line
from server_fixtures import serving_in_process

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO)


def messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def serve_requests(llm: AsyncLLM, options: ServerOptions, *bodies: dict, then_idle_s: float = 0) -> None:
    async def scenario() -> None:
        async with serving_in_process(llm, options) as server:
            for body in bodies:
                async with server.session.post(CHAT, json=body) as response:
                    assert response.status == 200, await response.text()
            await asyncio.sleep(then_idle_s)

    asyncio.run(scenario())


def test_access_log_has_a_line_per_request_with_client_status_and_latency(async_llm, caplog):
    serve_requests(async_llm, ServerOptions(), {"messages": MESSAGES, "max_tokens": 2})
    lines = messages(caplog, "tokmodel.access")
    assert any(re.fullmatch(r'127\.0\.0\.1:\d+ "GET /health" 200 [0-9.]+ ms', line) for line in lines), lines
    assert any(re.fullmatch(r'127\.0\.0\.1:\d+ "POST /v1/chat/completions" 200 [0-9.]+ ms', line) for line in lines)


def test_disabled_access_log_logs_no_request(async_llm, caplog):
    serve_requests(async_llm, ServerOptions(access_log=False), {"messages": MESSAGES, "max_tokens": 2})
    assert messages(caplog, "tokmodel.access") == []


def test_log_requests_logs_each_request_as_it_ends(async_llm, caplog):
    body = {"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True, "temperature": 0.5, "n": 2}
    serve_requests(async_llm, ServerOptions(log_requests=True), body)
    num_prompt = len(asyncio.run(async_llm.apply_chat_template(MESSAGES)))
    [line] = messages(caplog, "tokmodel.requests")
    assert re.fullmatch(rf"Finished request chatcmpl-\w+: prompt_tokens={num_prompt}, completion_tokens=6, "
                        r"finish_reason=length,length, "
                        r"params: SamplingParams\(n=2, temperature=0.5, .*max_tokens=3, .*", line), line


def test_no_request_details_without_log_requests(async_llm, caplog):
    serve_requests(async_llm, ServerOptions(), {"messages": MESSAGES, "max_tokens": 2})
    assert messages(caplog, "tokmodel.requests") == []


def test_stats_line_every_interval_while_busy_and_none_once_idle(async_llm, caplog):
    body = {"messages": MESSAGES, "max_tokens": 40, "ignore_eos": True}
    serve_requests(async_llm, ServerOptions(stats_interval_s=0.1), body, then_idle_s=0.5)
    lines = messages(caplog, "tokmodel.stats")
    pattern = (r"Avg prompt throughput: [0-9.]+ tokens/s, Avg generation throughput: [0-9.]+ tokens/s, "
               r"Running: (\d+) reqs, Waiting: \d+ reqs, GPU KV cache usage: [0-9.]+%, Prefix cache hit rate: [0-9.]+%")
    running = [int(re.fullmatch(pattern, line).group(1)) for line in lines]
    assert 1 in running
    # Five idle intervals after the request: only the first of them logs, the one that shows the work ended.
    assert running[-1] == 0 and running[-2:].count(0) == 1, lines


def test_stats_line_rates_are_per_second_over_the_interval():
    last = EngineStats(prefix_cache_queries=100, prefix_cache_hits=10, num_prompt_tokens=1000,
                       num_generation_tokens=500)
    now = EngineStats(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.25, prefix_cache_queries=300,
                      prefix_cache_hits=160, num_prompt_tokens=1200, num_generation_tokens=560)
    assert stats_line(last, now, 2.0) == (
        "Avg prompt throughput: 100.0 tokens/s, Avg generation throughput: 30.0 tokens/s, Running: 3 reqs, "
        "Waiting: 2 reqs, GPU KV cache usage: 25.0%, Prefix cache hit rate: 75.0%")
