"""Serving load: streaming chat requests at a fixed concurrency against OpenAI-compatible servers; prints JSON.

Measured as vLLM's benchmark_serving does: TTFT from sending the request to the first chunk with content, ITL
between consecutive content chunks, TPOT as (latency - TTFT) / (output tokens - 1), output tok/s as all output
tokens over the wall time of the run. Output tokens come from the usage chunk (stream_options.include_usage),
else from the number of content chunks.

    python benchmarks/serving.py --base-url http://localhost:8000            # a server already running
    python benchmarks/serving.py --launch tokmodel --launch transformers     # start each in turn, same weights
`--launch transformers` runs `transformers serve --continuous-batching`, which needs transformers[serving]
(fastapi, uvicorn, starlette, rich, accelerate).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["the ocean", "a lighthouse", "bread baking", "a chess match", "autumn", "a robot", "the moon", "a library",
          "trains", "a garden", "mountains", "a violin", "rain", "a market", "bees", "a bridge"]


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


async def stream_chat(session: aiohttp.ClientSession, url: str, payload: dict) -> Result:
    result, chunks = Result(), 0
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                return Result(error=f"{response.status}: {(await response.text())[:200]}")
            async for line in response.content:
                data = line.strip().removeprefix(b"data: ")
                if not data or data == b"[DONE]":
                    continue
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last, chunks = now, chunks + 1
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = chunks > 0
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        result.error = repr(e)
    return result


async def run_load(base_url: str, args: argparse.Namespace, extra_body: dict) -> dict:
    timeout = aiohttp.ClientTimeout(total=3600)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=args.concurrency)  # aiohttp's default caps a session at 100 connections
    async with aiohttp.ClientSession(timeout=timeout, headers=headers, connector=connector) as session:
        async with session.get(f"{base_url}/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        url = f"{base_url}/v1/chat/completions"

        def payload(i: int) -> dict:
            return {"model": model, "messages": conversation(i), "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}} | extra_body

        for i in range(args.warmup):  # lazy initialisation (kernels, the peer's batching manager) stays out of the figures
            await stream_chat(session, url, payload(-1 - i))
        limit = asyncio.Semaphore(args.concurrency)

        async def limited(i: int) -> Result:
            async with limit:
                return await stream_chat(session, url, payload(i))

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(args.num_requests)))
        return summarize(results, time.perf_counter() - start) | {"model": model}


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}. Story number {i}."}]


def run_offline(args: argparse.Namespace) -> dict:
    """The same requests through TokModel's offline LLM.chat in this process, all at once: the ceiling the
    server's own overhead is measured against."""
    sys.path.insert(0, str(REPO))
    from engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    llm.chat([conversation(-1 - i) for i in range(args.warmup)], params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.chat([conversation(i) for i in range(args.num_requests)], params, use_tqdm=False)
    duration = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"completed": len(outputs), "duration_s": round(duration, 3), "output_tokens": tokens,
            "output_tok_s": round(tokens / duration, 2)}


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    itls = [itl for r in ok for itl in r.itls]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {"completed": len(ok), "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if r.error})[:3],
            "duration_s": round(duration, 3), "output_tokens": tokens,
            "output_tok_s": round(tokens / duration, 2), "requests_s": round(len(ok) / duration, 3),
            "ttft_ms": _stats([r.ttft for r in ok]), "itl_ms": _stats(itls), "tpot_ms": _stats(tpots)}


def _stats(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000
    return {"mean": round(float(ms.mean()), 2), "p50": round(float(np.percentile(ms, 50)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2)}


@contextmanager
def launched(kind: str, args: argparse.Namespace) -> Iterator[str]:
    """Starts one server on args.port with the default model's weights and args.dtype; stops it afterwards."""
    port = str(args.port)
    if kind == "tokmodel":
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", port,
                   "--dtype", args.dtype, *args.tokmodel_args.split()]
        if args.model:
            command += ["--model", args.model]
    else:
        sys.path.insert(0, str(REPO))  # run as a script from a checkout that may not be installed
        from engine.loader import resolve_model  # the same converted weights TokModel loads

        model_dir = str(resolve_model(args.model))
        command = ["transformers", "serve", model_dir, "--continuous-batching", "--host", "127.0.0.1", "--port", port,
                   "--device", "cpu", "--dtype", args.dtype]
    process = subprocess.Popen(command, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr)
    base_url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_wait_ready(base_url, process))
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=120)


async def _wait_ready(base_url: str, process: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                async with session.get(f"{base_url}/v1/models") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{base_url} not ready after {timeout_s}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", action="append", default=[], help="a running server (repeatable)")
    parser.add_argument("--launch", action="append", default=[], choices=["tokmodel", "transformers"],
                        help="start this server, measure it, stop it (repeatable)")
    parser.add_argument("--model", help="for --launch (default: TokModel's default model)")
    parser.add_argument("--dtype", default="bfloat16", help="for --launch (default: bfloat16)")
    parser.add_argument("--tokmodel-args", default="", help="more flags for a launched tokmodel serve")
    parser.add_argument("--port", type=int, default=8123, help="for --launch")
    parser.add_argument("--api-key")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    parser.add_argument("--offline", action="store_true",
                        help="also run the same requests through the offline LLM in-process; with --launch tokmodel "
                        "the report adds the server's overhead: 1 - served tok/s / offline tok/s")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="ask for exactly --max-tokens tokens (an extension: not sent to a launched transformers serve)")
    args = parser.parse_args()
    if not args.base_url and not args.launch and not args.offline:
        parser.error("give --base-url, --launch or --offline")
    config = {k: getattr(args, k) for k in ("num_requests", "concurrency", "max_tokens")}
    reports = []
    if args.offline:
        reports.append({"server": "offline", **config, "dtype": args.dtype, **run_offline(args)})
    for base_url in args.base_url:
        reports.append({"server": base_url, **config, **asyncio.run(run_load(base_url, args, _extra(args, "tokmodel")))})
    for kind in args.launch:
        with launched(kind, args) as base_url:
            report = asyncio.run(run_load(base_url, args, _extra(args, kind)))
            reports.append({"server": kind, **config, "dtype": args.dtype, **report})
    rates = {r["server"]: r["output_tok_s"] for r in reports}
    if "offline" in rates and "tokmodel" in rates:
        reports.append({"server_overhead": round(1 - rates["tokmodel"] / rates["offline"], 4)})
    print(json.dumps(reports, indent=2))


def _extra(args: argparse.Namespace, kind: str) -> dict:
    return {"ignore_eos": True} if args.ignore_eos and kind == "tokmodel" else {}


if __name__ == "__main__":
    main()
