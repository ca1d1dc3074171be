"""`tokmodel bench serve`: load on any OpenAI-compatible endpoint, as `vllm bench serve` with its flag names, its
definitions and its JSON keys (bench/metrics.py): requests arrive as a Poisson process (or gamma, with
--burstiness) at --request-rate, at most --max-concurrency at a time; a progress bar while it runs, then a table,
a JSON file with --save-result, charts with --plot; --sweep-request-rates runs each rate on each --base-url and
draws throughput against latency, one line per endpoint."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import numpy as np
import tqdm

from bench import datasets
from bench.endpoint import BACKENDS, RequestFuncInput, RequestFuncOutput, send_request
from bench.metrics import GOODPUT_METRICS, METRICS, calculate_metrics, percentile_key

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TIMEOUT_S = 6 * 3600  # one request's limit, as vLLM's: a long generation at saturation is not a failure


class BenchmarkError(RuntimeError):
    """The run could not be made or gave nothing: one line for the user."""


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    endpoint = parser.add_argument_group("endpoint")
    endpoint.add_argument("--base-url", action="append", default=[], help="the server, e.g. http://127.0.0.1:8000; "
                          "repeat it to load several servers in turn (default: http://127.0.0.1:8000)")
    endpoint.add_argument("--backend", choices=list(BACKENDS), default="openai",
                          help="openai: /v1/completions bodies; openai-chat: /v1/chat/completions bodies")
    endpoint.add_argument("--endpoint", help="the path (default: the backend's)")
    endpoint.add_argument("--model", help="the model name sent (default: the first of GET /v1/models)")
    endpoint.add_argument("--header", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                          help="headers for every request; the key of $OPENAI_API_KEY goes as a bearer token")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=datasets.DATASET_NAMES, default="random")
    data.add_argument("--dataset-path", help="the ShareGPT-format JSON for --dataset-name sharegpt")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="lengths uniform in [L * (1 - r), L * (1 + r)]")
    data.add_argument("--sharegpt-output-len", type=int, help="instead of each reply's own length")
    data.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    data.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    data.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    data.add_argument("--prefix-repetition-output-len", type=int, default=128)
    data.add_argument("--tokenizer", help="counts the tokens (default: the model's; TokModel's default model's "
                      "when that is the model served)")
    data.add_argument("--seed", type=int, default=0)
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="requests per second, a Poisson process; inf sends them all at once (default: inf)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrival intervals: 1 is Poisson, lower is burstier")
    load.add_argument("--max-concurrency", type=int, help="most requests in flight at once (default: no limit)")
    load.add_argument("--num-warmups", type=int, default=0, help="requests sent before the measured run")
    load.add_argument("--sweep-request-rates", help="comma-separated rates (inf allowed): one run per rate and "
                      "--base-url, then a JSON of them all and a chart of throughput against latency")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: every request runs its full length")
    sampling.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy, as vLLM's)")
    sampling.add_argument("--top-p", type=float, help="sent when given (default: the server's)")
    result = parser.add_argument_group("result")
    result.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                        help=f"service-level limits for request_goodput, from {', '.join(GOODPUT_METRICS)}")
    result.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                        help=f"metrics to report, from {','.join(METRICS)} (default: ttft,tpot,itl)")
    result.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles (default: 99)")
    result.add_argument("--save-result", action="store_true", help="write the JSON")
    result.add_argument("--result-dir", default=".", help="where the JSON and charts go (default: .)")
    result.add_argument("--result-filename", help="(default: BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json)")
    result.add_argument("--plot", action="store_true", help="also draw PNG charts next to the JSON (matplotlib)")
    result.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """args with the derived settings; ValueError naming the flag for a bad one."""
    args.base_url = [url.rstrip("/") for url in args.base_url] or ["http://127.0.0.1:8000"]
    args.endpoint = args.endpoint or BACKENDS[args.backend]
    args.percentile_metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if bad := set(args.percentile_metrics) - set(METRICS):
        raise ValueError(f"--percentile-metrics: unknown {sorted(bad)}; choose from {','.join(METRICS)}")
    args.metric_percentiles = [_number("--metric-percentiles", p) for p in args.metric_percentiles.split(",")]
    if not all(0 < p <= 100 for p in args.metric_percentiles):
        raise ValueError("--metric-percentiles must be in (0, 100]")
    args.goodput = parse_goodput(args.goodput)
    args.headers = dict(_key_value(h) for h in args.header)
    if key := os.environ.get("OPENAI_API_KEY"):
        args.headers.setdefault("Authorization", f"Bearer {key}")
    args.rates = ([_number("--sweep-request-rates", r) for r in args.sweep_request_rates.split(",")]
                  if args.sweep_request_rates else [args.request_rate])
    for flag, value in (("--num-prompts", args.num_prompts), ("--burstiness", args.burstiness),
                        *(("--request-rate", rate) for rate in args.rates)):
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    if args.dataset_name == "sharegpt" and not args.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path")
    return args


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    goodput = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in GOODPUT_METRICS or not value:
            raise ValueError(f"--goodput: {item!r} is not METRIC:MS with METRIC in {', '.join(GOODPUT_METRICS)}")
        goodput[name] = _number("--goodput", value)
        if goodput[name] < 0:
            raise ValueError(f"--goodput: {item!r} is negative")
    return goodput


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a number") from None


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--header: {item!r} is not KEY=VALUE")
    return key, value


def run_serve(args: argparse.Namespace) -> list[dict]:
    """Every (base URL, rate) run, each printed as a table; saved and drawn as asked. Raises BenchmarkError when
    every request of a run failed (after printing and saving it)."""
    return asyncio.run(serve_runs(args))


async def serve_runs(args: argparse.Namespace) -> list[dict]:
    """run_serve for a caller already on an event loop."""
    args = checked(args)
    results = []
    for base_url in args.base_url:
        model = args.model or await served_model(base_url, args.headers)
        tokenizer = load_tokenizer(args.tokenizer, model)
        requests = sample_requests(args, tokenizer)
        for rate in args.rates:
            result, outputs = await benchmark(args, base_url, model, requests, tokenizer, rate)
            print_table(result, args)
            results.append(result)
            if args.save_result or args.plot:
                save_run(result, outputs, args)
    if len(args.rates) > 1 or len(args.base_url) > 1:
        from bench.plots import plot_sweep

        path = Path(args.result_dir) / f"sweep-{_stamp()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([_headline(r) for r in results], indent=2) + "\n")
        print(f"sweep: {path}")
        try:
            print(f"chart: {plot_sweep(results, path.with_suffix('.png'))}")
        except RuntimeError as e:  # no matplotlib: the sweep's JSON stands without its chart
            print(f"no chart: {e}")
    if failed := [r for r in results if r["completed"] == 0]:
        errors = [e for e in failed[0]["errors"] if e]
        raise BenchmarkError(f"all {failed[0]['failed']} requests to {failed[0]['base_url']} failed: {errors[0]}")
    return results


async def served_model(base_url: str, headers: dict[str, str]) -> str:
    """The first model of GET /v1/models; BenchmarkError with the reason when the server does not answer."""
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(f"{base_url}/v1/models") as response:
                if response.status != 200:
                    raise BenchmarkError(f"GET {base_url}/v1/models: HTTP {response.status}; give --model")
                return (await response.json())["data"][0]["id"]
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise BenchmarkError(f"cannot reach {base_url}: {type(e).__name__}: {e}") from None


@functools.cache  # a sweep, or a run per --base-url, counts with one tokenizer
def load_tokenizer(name: str | None, model: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    from engine.loader import DEFAULT_MODEL_NAME, resolve_model

    try:
        if name is None and model == DEFAULT_MODEL_NAME:
            return AutoTokenizer.from_pretrained(resolve_model(None))
        return AutoTokenizer.from_pretrained(name or model)
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"no tokenizer for {name or model!r} (give --tokenizer): {e}") from None


def sample_requests(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> list[datasets.SampleRequest]:
    if args.dataset_name == "random":
        return datasets.random_requests(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                                        args.random_range_ratio, args.seed)
    if args.dataset_name == "sharegpt":
        return datasets.sharegpt_requests(tokenizer, args.dataset_path, args.num_prompts, args.sharegpt_output_len,
                                          args.seed)
    return datasets.prefix_repetition_requests(
        tokenizer, args.num_prompts, args.prefix_repetition_prefix_len, args.prefix_repetition_suffix_len,
        args.prefix_repetition_num_prefixes, args.prefix_repetition_output_len, args.seed)


def _sampling_fields(args: argparse.Namespace) -> dict:
    fields = {"temperature": args.temperature}
    if args.top_p is not None:
        fields["top_p"] = args.top_p
    return fields


async def benchmark(args: argparse.Namespace, base_url: str, model: str, requests: list[datasets.SampleRequest],
                    tokenizer: PreTrainedTokenizerBase, rate: float) -> tuple[dict, list[RequestFuncOutput]]:
    inputs = [RequestFuncInput(r.prompt, base_url + args.endpoint, r.prompt_len, r.expected_output_len, model,
                               chat=args.backend == "openai-chat", ignore_eos=args.ignore_eos,
                               extra_body=_sampling_fields(args)) for r in requests]
    # aiohttp caps a session at 100 connections unless told: the concurrency is ours to set, not its. A connection
    # per request (a local handshake, well under a millisecond): servers close idle keep-alive connections sooner
    # than aiohttp stops reusing them (llama.cpp's server after 5 s, aiohttp after 15), and a request written to
    # a closed one fails ("Can not write request body"): 8 of 32 at concurrency 16 against llama-server.
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, headers=args.headers,
                                     timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
        progress = tqdm.tqdm(total=len(inputs), disable=args.disable_tqdm, desc=f"{base_url} at {rate} req/s")

        async def limited(request: RequestFuncInput) -> RequestFuncOutput:
            async with limit:
                output = await send_request(request, session)
            progress.update()
            return output

        await asyncio.gather(*(send_request(inputs[0], session) for _ in range(args.num_warmups)))
        start = time.perf_counter()
        tasks = []
        async for request in arrivals(inputs, rate, args.burstiness, args.seed):
            tasks.append(asyncio.create_task(limited(request)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        progress.close()
    result = {"date": _stamp(), "backend": args.backend, "base_url": base_url, "endpoint": args.endpoint,
              "model_id": model, "tokenizer_id": args.tokenizer or model, "dataset_name": args.dataset_name,
              "num_prompts": len(inputs), "request_rate": rate, "burstiness": args.burstiness,
              "max_concurrency": args.max_concurrency}
    return result | calculate_metrics(outputs, duration, tokenizer, args.percentile_metrics, args.metric_percentiles,
                                      args.goodput), outputs


async def arrivals(items: list, rate: float, burstiness: float, seed: int):
    """Yields items at gamma-distributed intervals of mean 1 / rate (shape burstiness: 1 is Poisson); at once
    for an infinite rate."""
    rng = np.random.default_rng(seed)
    for item in items:
        yield item
        if rate != float("inf"):
            await asyncio.sleep(rng.gamma(shape=burstiness, scale=1 / (rate * burstiness)))


def print_table(result: dict, args: argparse.Namespace) -> None:
    """vLLM's table of a run."""
    rows = [("Successful requests:", result["completed"]), ("Failed requests:", result["failed"]),
            ("Maximum request concurrency:", result["max_concurrency"]),
            ("Benchmark duration (s):", result["duration"]), ("Total input tokens:", result["total_input_tokens"]),
            ("Total generated tokens:", result["total_output_tokens"]),
            ("Request throughput (req/s):", result["request_throughput"])]
    if "request_goodput" in result:
        rows.append(("Request goodput (req/s):", result["request_goodput"]))
    rows += [("Output token throughput (tok/s):", result["output_throughput"]),
             ("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"]),
             ("Peak concurrent requests:", result["max_concurrent_requests"]),
             ("Total Token throughput (tok/s):", result["total_token_throughput"])]
    lines = [" Serving Benchmark Result ".center(50, "="), f"{'Endpoint:':<40}{result['base_url']}"]
    lines += [f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value}"
              for label, value in rows]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for metric in args.percentile_metrics:
        lines.append(f" {titles[metric]} ".center(50, "-"))
        name = metric.upper()
        lines += [f"{f'Mean {name} (ms):':<40}{result[f'mean_{metric}_ms']:<10.2f}",
                  f"{f'Median {name} (ms):':<40}{result[f'median_{metric}_ms']:<10.2f}"]
        lines += [f"{f'P{int(p) if int(p) == p else p} {name} (ms):':<40}{result[percentile_key(metric, p)]:<10.2f}"
                  for p in args.metric_percentiles]
    if errors := sorted({e.splitlines()[0] for e in result["errors"] if e}):
        lines.append(" Errors (distinct, first 3) ".center(50, "-"))
        lines += [e[:200] for e in errors[:3]]
    print("\n".join(lines + ["=" * 50]), flush=True)


def save_run(result: dict, outputs: list[RequestFuncOutput], args: argparse.Namespace) -> None:
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    name = args.result_filename if args.result_filename and len(args.rates) == len(args.base_url) == 1 else (
        f"{args.backend}-{result['request_rate']}qps{concurrency}-{result['model_id'].split('/')[-1]}-"
        f"{result['date']}.json")
    path = Path(args.result_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.save_result:
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"result: {path}")
    if args.plot:
        from bench.plots import plot_run

        print(f"charts: {', '.join(str(p) for p in plot_run(result, outputs, path))}")


def _headline(result: dict) -> dict:
    """A run without its per-request lists."""
    return {k: v for k, v in result.items() if k not in ("input_lens", "output_lens", "ttfts", "itls", "errors")}


def _stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
