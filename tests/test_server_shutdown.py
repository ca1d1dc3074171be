"""SIGTERM drains the server: it stops accepting, lets short requests finish, aborts the rest, and exits 0."""
from __future__ import annotations

import http.client
import signal
import threading
import time

import pytest

from server_fixtures import Server, running_server

GRACE_S = 3
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server() -> Server:
    with running_server("--shutdown-grace-period", str(GRACE_S), "--max-model-len", "1024") as s:
        yield s


def read_all(events, into: list) -> None:
    try:
        into.extend(events)
    except (http.client.HTTPException, OSError):
        pass  # cut off mid-chunk


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_zero(server):
    short = server.stream(CHAT, {"messages": MESSAGES, "max_tokens": 6, "ignore_eos": True, "stream": True})
    long = server.stream(CHAT, {"messages": MESSAGES, "max_tokens": 900, "ignore_eos": True, "stream": True})
    started = [next(short), next(long)]
    results: dict[str, list] = {}
    readers = [threading.Thread(target=read_all, args=(events, results.setdefault(name, [])))
               for name, events in (("short", short), ("long", long))]
    for reader in readers:
        reader.start()
    server.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert server.process.wait(timeout=GRACE_S + 30) == 0
    assert time.monotonic() - sent < GRACE_S + 5, "the drain overran its grace period"
    for reader in readers:
        reader.join(timeout=10)
    assert all(chunk["choices"] for chunk in started)
    assert results["short"][-1] == "[DONE]"
    finishes = [c["finish_reason"] for chunk in results["short"][:-1] for c in chunk["choices"] if c["finish_reason"]]
    assert finishes == ["length"]
    # The long request could not finish within the grace period: it was cut off instead.
    assert "[DONE]" not in results["long"]
    with pytest.raises(OSError):
        server.request("GET", "/health")
