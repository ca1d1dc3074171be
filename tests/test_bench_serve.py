"""`tokmodel bench serve`, the harness users point at any OpenAI-compatible server: its arithmetic on timings we
make up (vLLM's definitions, worked by hand), its datasets' exact token counts, goodput, failures counted and
never hidden (a dead endpoint, one that errors mid-stream), and one real run against `tokmodel serve` whose token
totals the official openai client confirms."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from bench import datasets
from bench.endpoint import RequestFuncOutput
from bench.metrics import calculate_metrics
from server.cli import main
from server_fixtures import free_port, openai_client, running_server, validate

MODEL = "SmolLM2-135M-Instruct"  # TokModel's default model: bench serve then uses its tokenizer


def synthetic_outputs() -> list[RequestFuncOutput]:
    return [RequestFuncOutput(prompt_len=10, success=True, output_tokens=3, start_time=100.0, ttft=0.1,
                              itl=[0.02, 0.03], latency=0.15),
            RequestFuncOutput(prompt_len=5, success=True, output_tokens=1, start_time=100.5, ttft=0.2, latency=0.2),
            RequestFuncOutput(prompt_len=7, error="HTTP 500: boom")]


def test_metrics_follow_vllms_definitions_on_synthetic_timings() -> None:
    m = calculate_metrics(synthetic_outputs(), 2.0, None, ["ttft", "tpot", "itl", "e2el"], [50, 99])
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 15, 4)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 2.0 and m["total_token_throughput"] == 9.5
    # TPOT excludes the first token and skips single-token requests: (0.15 - 0.1) / (3 - 1)
    assert m["mean_tpot_ms"] == pytest.approx(25.0) and m["p99_tpot_ms"] == pytest.approx(25.0)
    assert m["mean_ttft_ms"] == pytest.approx(150.0) and m["p99_ttft_ms"] == pytest.approx(199.0)
    assert m["mean_itl_ms"] == pytest.approx(25.0) and m["median_e2el_ms"] == pytest.approx(175.0)
    assert m["p50_itl_ms"] == pytest.approx(25.0) and m["std_ttft_ms"] == pytest.approx(50.0)
    # every token of both requests falls in the run's first second, while both were in flight
    assert m["max_output_tokens_per_s"] == 4 and m["max_concurrent_requests"] == 2
    assert m["errors"] == ["", "", "HTTP 500: boom"] and m["output_lens"] == [3, 1, 0]
    assert "request_goodput" not in m


@pytest.mark.parametrize("goodput, good", [({"ttft": 150}, 1), ({"tpot": 20}, 1), ({"e2el": 200}, 2),
                                           ({"ttft": 150, "e2el": 100}, 0)])
def test_goodput_counts_completed_requests_within_every_limit(goodput: dict, good: int) -> None:
    # request 1: TTFT 100 ms, TPOT 25 ms, E2EL 150 ms; request 2: 200, 0 (one token, as vLLM counts it), 200
    m = calculate_metrics(synthetic_outputs(), 2.0, None, ["ttft"], [99], goodput)
    assert m["request_goodput"] == good / 2.0


def test_output_tokens_are_counted_by_the_tokenizer_without_a_usage_chunk(tokenizer) -> None:
    output = RequestFuncOutput(prompt_len=3, success=True, generated_text=" The quick brown fox", ttft=0.1,
                               itl=[0.1, 0.1, 0.1], latency=0.4)
    m = calculate_metrics([output], 1.0, tokenizer, ["tpot"], [99])
    assert m["total_output_tokens"] == len(tokenizer.encode(" The quick brown fox")) == 4
    assert m["mean_tpot_ms"] == pytest.approx(100.0)


def test_random_prompts_have_exactly_the_drawn_token_counts(tokenizer) -> None:
    requests = datasets.random_requests(tokenizer, 12, 40, 9, range_ratio=0.5, seed=3)
    rng = np.random.default_rng(3)
    assert [r.prompt_len for r in requests] == rng.integers(20, 61, 12).tolist()
    assert [r.expected_output_len for r in requests] == rng.integers(4, 15, 12).tolist()
    assert all(len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len for r in requests)


def test_prefix_repetition_shares_each_prefix_among_its_prompts(tokenizer) -> None:
    requests = datasets.prefix_repetition_requests(tokenizer, 9, prefix_len=48, suffix_len=8, num_prefixes=3,
                                                   output_len=5)
    prefixes = {tokenizer.decode(tokenizer.encode(r.prompt, add_special_tokens=False)[:48]) for r in requests}
    assert len(prefixes) == 3 and len({r.prompt for r in requests}) == 9
    assert {r.prompt_len for r in requests} == {56} and {r.expected_output_len for r in requests} == {5}


def test_sharegpt_takes_first_turns_and_drops_what_vllm_drops(tokenizer, tmp_path: Path) -> None:
    turn = lambda who, text: {"from": who, "value": text}  # noqa: E731
    entries = [{"conversations": [turn("human", "Tell me about the sea and its tides."),
                                  turn("gpt", "The sea rises and falls twice a day because of the moon.")]},
               {"conversations": [turn("human", "Hi"), turn("gpt", "Hello there, how can I help you today?")]},
               {"conversations": [turn("human", "Only one turn here, so it is skipped.")]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    (request,) = datasets.sharegpt_requests(tokenizer, str(path), 1)
    assert request.prompt == "Tell me about the sea and its tides."
    assert request.prompt_len == len(tokenizer.encode(request.prompt, add_special_tokens=False))
    assert request.expected_output_len == len(tokenizer.encode(entries[0]["conversations"][1]["value"],
                                                               add_special_tokens=False))
    with pytest.raises(ValueError, match="--num-prompts"):
        datasets.sharegpt_requests(tokenizer, str(path), 2)  # "Hi" is under 4 tokens


@pytest.mark.parametrize("flags, message", [(["--goodput", "ttfx:5"], "--goodput"),
                                            (["--metric-percentiles", "99,x"], "--metric-percentiles"),
                                            (["--percentile-metrics", "ttft,foo"], "--percentile-metrics"),
                                            (["--request-rate", "0"], "--request-rate"),
                                            (["--dataset-name", "sharegpt"], "--dataset-path")])
def test_a_bad_flag_is_one_line_naming_it_and_exit_2(flags: list[str], message: str, capsys) -> None:
    assert main(["bench", "serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokmodel: error: ") and message in err and err.count("\n") == 1


def bench(*flags: str) -> int:
    return main(["bench", "serve", "--disable-tqdm", "--random-input-len", "16", "--random-output-len", "4",
                 *flags])


def test_a_dead_endpoint_without_model_is_a_one_line_error(capsys) -> None:
    assert bench("--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2") == 1
    err = capsys.readouterr().err
    assert err.startswith("tokmodel: error: BenchmarkError: cannot reach") and "Traceback" not in err


def test_a_dead_endpoint_gives_a_result_with_every_request_failed(tmp_path: Path, capsys) -> None:
    code = bench("--base-url", f"http://127.0.0.1:{free_port()}", "--model", MODEL, "--num-prompts", "3",
                 "--save-result", "--result-dir", str(tmp_path), "--result-filename", "dead.json")
    out, err = capsys.readouterr()
    assert code == 1 and "all 3 requests" in err and "Traceback" not in err + out
    result = json.loads((tmp_path / "dead.json").read_text())
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (0, 3, 0)
    assert all("ClientConnectorError" in e for e in result["errors"])
    assert "Failed requests:                        3" in out


def misbehaving() -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler whose n-th request streams properly (n = 1), sends an error object mid-stream (2), breaks the
    connection mid-stream (3) or answers 500 (4)."""
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return await _misbehave(request, calls)

    return handler


async def _misbehave(request: web.Request, n: int) -> web.StreamResponse:
    if n % 4 == 0:
        return web.json_response({"error": {"message": "overloaded"}}, status=500)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for text in ("Hel", "lo"):
        await response.write(f'data: {json.dumps({"choices": [{"index": 0, "text": text}]})}\n\n'.encode())
        await asyncio.sleep(0.01)
    if n % 4 == 2:
        await response.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
    elif n % 4 == 3:
        request.transport.close()
        return response
    else:
        usage = {"choices": [], "usage": {"prompt_tokens": 16, "completion_tokens": 2, "total_tokens": 18}}
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
    await response.write_eof()
    return response


@contextmanager
def fake_endpoint(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Iterator[str]:
    """An aiohttp server on its own thread and loop (bench serve runs its own loop), serving /v1/completions."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_requests_that_fail_mid_stream_are_counted_failed_with_their_errors(tmp_path: Path, capsys) -> None:
    with fake_endpoint(misbehaving()) as base_url:
        code = bench("--base-url", base_url, "--model", MODEL, "--num-prompts", "4", "--max-concurrency", "1",
                     "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json")
    assert code == 0  # some requests completed: the run stands, its failures in the table and the JSON
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (1, 3, 2)
    assert result["total_input_tokens"] == result["input_lens"][0]  # only the completed request's prompt
    errors = result["errors"]
    assert errors[0] == "" and "engine died" in errors[1] and "ClientPayloadError" in errors[2]
    assert errors[3].startswith("HTTP 500") and "overloaded" in errors[3]
    assert "Failed requests:                        3" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="module")
def server(trace_dir: Path):
    config = json.dumps({"profiler": "torch", "torch_profiler_dir": str(trace_dir)})
    with running_server("--dtype", "float32", "--max-model-len", "512", "--profiler-config", config) as s:
        yield s


def test_a_run_against_tokmodel_serve_counts_what_the_server_reports(server, tokenizer, tmp_path: Path) -> None:
    assert bench("--base-url", server.base_url, "--num-prompts", "4", "--ignore-eos", "--save-result", "--plot",
                 "--result-dir", str(tmp_path), "--result-filename", "run.json", "--goodput", "e2el:600000") == 0
    result = json.loads((tmp_path / "run.json").read_text())
    assert (result["completed"], result["failed"], result["model_id"]) == (4, 0, MODEL)
    # the same prompts through the official client: the server's own token counts
    client = openai_client(server)
    usages = [client.completions.create(model=MODEL, prompt=r.prompt, max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True}).usage
              for r in datasets.random_requests(tokenizer, 4, 16, 4)]
    assert result["total_input_tokens"] == sum(u.prompt_tokens for u in usages) == 64
    assert result["output_lens"] == [u.completion_tokens for u in usages] == [4] * 4
    assert result["request_goodput"] == result["request_throughput"]
    assert all(result[k] > 0 for k in ("mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p99_itl_ms"))
    assert len(result["itls"][0]) == 3  # one gap per token after the first
    assert {p.name for p in tmp_path.glob("*.png")} == {"run-latency.png", "run-throughput.png"}


def test_a_sweep_over_two_endpoints_draws_one_chart(server, tmp_path: Path) -> None:
    assert bench("--base-url", server.base_url, "--base-url", server.base_url.replace("127.0.0.1", "localhost"), "--backend", "openai-chat",
                 "--num-prompts", "1", "--random-output-len", "2", "--sweep-request-rates", "8,inf",
                 "--result-dir", str(tmp_path)) == 0
    (sweep,) = tmp_path.glob("sweep-*.json")
    runs = json.loads(sweep.read_text())
    assert [r["request_rate"] for r in runs] == [8, float("inf")] * 2
    assert all(r["completed"] == 1 and r["endpoint"] == "/v1/chat/completions" for r in runs)
    assert sweep.with_suffix(".png").stat().st_size > 0


def test_tokmodel_profile_drives_the_servers_profiler(server, trace_dir: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    assert main(["profile", "--base-url", server.base_url, "--num-prompts", "2", "--input-len", "16",
                 "--output-len", "3", "--no-limits", "--output-json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert Path(report["trace"]).parent == trace_dir and report["device"] == "cpu"
    calls = {row["name"]: row["calls"] for row in report["kernels"]}
    num_layers = 30  # SmolLM2-135M: each step runs each layer's norms, and the final norm once
    assert report["steps"] >= 3 and calls["rms_norm"] == report["steps"] * (2 * num_layers + 1)
    assert calls["prefill_attention"] >= 1 and calls["rotary_embedding_and_write_kv"] == report["steps"] * num_layers


def test_stopping_a_profiler_that_is_not_running_is_an_openai_error(server) -> None:
    response = server.post("/stop_profile", {})
    assert response.status == 409 and "not running" in response.json()["error"]["message"]
    validate(response.json(), "ErrorResponse")


@pytest.mark.parametrize("config, message", [('{"profiler": "nsys"}', '"profiler" must be "torch"'),
                                             ('{"profiler": "torch"}', "torch_profiler_dir"),
                                             ("{", "not JSON")])
def test_a_bad_profiler_config_is_refused_before_the_model_loads(config: str, message: str, capsys) -> None:
    assert main(["serve", "--profiler-config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokmodel: error: --profiler-config") and message in err
