"""The first SIGTERM or Ctrl-C drains: the server keeps listening but answers 503, lets short requests finish,
aborts the rest after the grace period (a stream with an error event and [DONE], others with a 503) and exits 0;
a second signal aborts at once."""
from __future__ import annotations

import http.client
import re
import signal
import threading
import time

from server_fixtures import Server, running_server

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]
LONG = {"messages": MESSAGES, "max_tokens": 900, "ignore_eos": True}  # far longer than any test waits for


def read_all(events, into: list) -> None:
    try:
        into.extend(events)
    except (http.client.HTTPException, OSError):
        pass  # cut off mid-chunk: the assertions on `into` say what was missing


def in_background(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


def wait_until_draining(server: Server) -> None:
    deadline = time.monotonic() + 5
    while server.request("GET", "/health").status != 503:  # raises if the server stopped listening
        assert time.monotonic() < deadline, "/health never answered 503"
        time.sleep(0.05)


def assert_aborted_stream(events: list) -> None:
    assert events[-1] == "[DONE]", events[-3:]
    assert events[-2]["error"]["code"] == "aborted", events[-3:]


def test_first_signal_drains_finishes_short_requests_aborts_long_ones_and_exits_zero():
    grace_s = 3
    with running_server("--shutdown-grace-period", str(grace_s), "--max-model-len", "1024") as server:
        whole: list = []
        threads = [in_background(lambda: whole.append(server.post(CHAT, LONG)))]
        server.wait_for("tokmodel:num_requests_running", 1)
        short = server.stream(CHAT, {"messages": MESSAGES, "max_tokens": 6, "ignore_eos": True, "stream": True})
        long = server.stream(CHAT, LONG | {"stream": True})
        events: dict[str, list] = {"short": [next(short)], "long": [next(long)]}
        threads += [in_background(read_all, short, events["short"]), in_background(read_all, long, events["long"])]

        server.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        wait_until_draining(server)
        refused = server.post(CHAT, {"messages": MESSAGES, "max_tokens": 2})
        assert refused.status == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert server.process.wait(timeout=grace_s + 30) == 0
        assert time.monotonic() - sent < grace_s + 5, "the drain overran its grace period"
        for thread in threads:
            thread.join(timeout=10)

        assert events["short"][-1] == "[DONE]"
        choices = [choice for chunk in events["short"][:-1] for choice in chunk["choices"]]
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
        assert_aborted_stream(events["long"])
        [response] = whole
        assert response.status == 503 and response.json()["error"]["code"] == "aborted"
        log = server.log_path.read_text()
        assert re.search(rf"TokModel draining \d requests for up to {grace_s} s; press Ctrl-C again to stop now", log)


def test_second_signal_aborts_at_once():
    with running_server("--shutdown-grace-period", "600", "--max-model-len", "1024") as server:
        long = server.stream(CHAT, LONG | {"stream": True})
        events = [next(long)]
        reader = in_background(read_all, long, events)
        server.process.send_signal(signal.SIGINT)
        wait_until_draining(server)
        server.process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        server.process.wait(timeout=30)
        assert time.monotonic() - sent < 10, "the second signal did not stop the server at once"
        reader.join(timeout=10)
        assert_aborted_stream(events)
