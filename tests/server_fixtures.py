"""A real `tokmodel serve` in a subprocess on a free port, raw HTTP helpers, and OpenAI schema validation; and
server.lifecycle.serve() on the test's own event loop, for tests that reach into the engine."""
from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import aiohttp
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import AsyncLLM
from server.app import ServerOptions
from server.lifecycle import serve
from server.startup import bind_socket

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "tests" / "openai-chat-schemas.json"  # a subset of OpenAI's published OpenAPI spec
STARTUP_TIMEOUT_S = 600  # the first start may fetch and convert the default model


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def headers(self, auth: bool = True) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if auth and self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request(self, method: str, path: str, body: dict | bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        conn = self.connection()
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            conn.request(method, path, body=data, headers=self.headers() if headers is None else headers)
            response = conn.getresponse()
            return Response(response.status, dict(response.headers), response.read())
        finally:
            conn.close()

    def post(self, path: str, body: dict | bytes) -> Response:
        return self.request("POST", path, body)

    def stream(self, path: str, body: dict) -> Iterator[dict | str]:
        """The SSE events of a streaming request, parsed; "[DONE]" as the string. Closing the iterator
        closes the connection, which is how a client disconnects."""
        conn = self.connection()
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers=self.headers())
            response = conn.getresponse()
            assert response.status == 200, response.read()
            for line in response:
                if line.startswith(b"data: "):
                    data = line[len(b"data: "):].strip()
                    yield data.decode() if data == b"[DONE]" else json.loads(data)
        finally:
            conn.close()

    def send(self, path: str, body: dict) -> socket.socket:
        """Sends a POST and returns its socket unread: closing it is a client that disconnects."""
        data = json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in self.headers().items())
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        return sock

    def wait_for(self, gauge: str, at_least: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.gauge(gauge) < at_least:
            assert time.monotonic() < deadline, f"{gauge} never reached {at_least}"
            time.sleep(0.05)

    def metrics(self) -> dict[str, list]:
        """Samples of /metrics by sample name (counters keep their _total suffix)."""
        text = self.request("GET", "/metrics").body.decode()
        samples: dict[str, list] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(sample)
        return samples

    def gauge(self, name: str) -> float:
        return self.metrics()[name][0].value

    def wait_until_idle(self, timeout: float = 10) -> None:
        """Until no request runs or waits and no KV block is held, as the engine reports it."""
        names = ("tokmodel:num_requests_running", "tokmodel:num_requests_waiting", "tokmodel:kv_cache_usage_perc")
        deadline = time.monotonic() + timeout
        while any(values := [self.gauge(name) for name in names]):
            assert time.monotonic() < deadline, f"still busy after {timeout}s: {dict(zip(names, values))}"
            time.sleep(0.05)


@pytest.fixture(autouse=True)
def leaves_server_idle(server: Server) -> Iterator[None]:
    """Imported by a test module, every test there must leave its module's shared server idle (nothing running,
    waiting or holding KV blocks), so that one failing test cannot break the tests after it."""
    yield
    server.wait_until_idle(timeout=30)


def openai_client(server: Server) -> openai.OpenAI:
    """The official client on the server's /v1, with its key if it has one, and no retries: a test sees every error."""
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key or "unused", max_retries=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*args: str, api_key: str | None = None) -> Iterator[Server]:
    """`tokmodel serve` with the given flags, ready (GET /health is 200) when this yields; SIGTERM afterwards."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="tokmodel-serve-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    if api_key:
        command += ["--api-key", api_key]
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, port, Path(log.name), api_key)
    try:
        _wait_healthy(server)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
        log.close()


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.process.poll() is None, f"server exited:\n{server.log_path.read_text()[-4000:]}"
        try:
            if server.request("GET", "/health").status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log_path.read_text()[-4000:]}")


@dataclass
class InProcessServer:
    session: aiohttp.ClientSession  # with the server's base URL: session.get("/health")
    serving: asyncio.Task  # serve() itself; its result is the exit code


@asynccontextmanager
async def serving_in_process(llm: AsyncLLM, options: ServerOptions) -> AsyncIterator[InProcessServer]:
    """serve() on this event loop, on a free port, ready when this yields; stopped afterwards, unless it already
    ended, by the SIGINT it handles (this process's main thread, where pytest runs the test, receives it)."""
    sock = bind_socket("127.0.0.1", 0)
    serving = asyncio.create_task(serve(llm, options, sock))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{sock.getsockname()[1]}") as session:
        while not await _answers_health(session):
            assert not serving.done(), f"serve() ended with {serving.result()}"
            await asyncio.sleep(0.05)
        try:
            yield InProcessServer(session, serving)
        finally:
            if not serving.done():
                signal.raise_signal(signal.SIGINT)
            await asyncio.wait_for(serving, timeout=30)


async def _answers_health(session: aiohttp.ClientSession) -> bool:
    try:
        async with session.get("/health") as response:
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


@cache
def _components() -> dict:
    return json.loads(SCHEMAS.read_text())["components"]


def validate(instance: dict, schema_name: str) -> None:
    """Raises unless instance is valid against components.schemas[schema_name] of OpenAI's spec."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    jsonschema.Draft202012Validator(schema).validate(instance)
