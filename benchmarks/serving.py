"""Serving campaigns: start servers, load each with `tokmodel bench serve` (bench/serve.py: vLLM's definitions),
print a JSON summary per server; --offline adds the same requests through the offline LLM, for the server's
overhead. The load: streaming chat requests of random 32-token prompts at a fixed concurrency.

    python benchmarks/serving.py --base-url http://localhost:8000            # a server already running
    python benchmarks/serving.py --launch tokmodel --launch transformers     # start each in turn, same weights
    python benchmarks/serving.py --launch llama.cpp --gguf smollm2-bf16.gguf --launch tokmodel
`--launch transformers` runs `transformers serve --continuous-batching`, which needs transformers[serving]
(fastapi, uvicorn, starlette, rich, accelerate). `--launch llama.cpp` runs llama.cpp's `llama-server` (--llama-server,
default: on the PATH) on --gguf, a GGUF of the same weights (llama.cpp's convert_hf_to_gguf.py of the converted
checkpoint TokModel loads, --outtype bf16), with one slot per concurrent request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere in the checkout

from bench.serve import add_serve_args, serve_runs  # noqa: E402

PROMPT_LEN = 32


async def run_load(base_url: str, args: argparse.Namespace, extra_body: dict, tokenizer: str | None = None) -> dict:
    """`tokmodel bench serve` (bench/serve.py) on base_url: args.num_requests streaming chat requests of random
    PROMPT_LEN-token prompts, args.concurrency at a time, args.max_tokens each, after args.warmup untimed ones;
    summarized in this script's keys (benchmarks/gpu_check_report.py reads them)."""
    argv = ["--base-url", base_url, "--backend", "openai-chat", "--num-prompts", str(args.num_requests),
            "--max-concurrency", str(args.concurrency), "--random-input-len", str(PROMPT_LEN),
            "--random-output-len", str(args.max_tokens), "--num-warmups", str(args.warmup),
            "--metric-percentiles", "50,99", "--disable-tqdm"]
    if tokenizer or args.model:
        argv += ["--tokenizer", tokenizer or args.model]
    if extra_body.get("ignore_eos"):
        argv.append("--ignore-eos")
    argv += ["--temperature", str(args.temperature)] + (["--top-p", str(args.top_p)] if args.top_p is not None else [])
    if args.api_key:
        argv += ["--header", f"Authorization=Bearer {args.api_key}"]
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    (result,) = await serve_runs(parser.parse_args(argv))
    stats = lambda metric: {"mean": round(result[f"mean_{metric}_ms"], 2),  # noqa: E731
                            "p50": round(result[f"p50_{metric}_ms"], 2), "p99": round(result[f"p99_{metric}_ms"], 2)}
    return {"completed": result["completed"], "failed": result["failed"],
            "errors": sorted({e for e in result["errors"] if e})[:3], "duration_s": round(result["duration"], 3),
            "output_tokens": result["total_output_tokens"], "output_tok_s": round(result["output_throughput"], 2),
            "requests_s": round(result["request_throughput"], 3), "ttft_ms": stats("ttft"), "itl_ms": stats("itl"),
            "tpot_ms": stats("tpot"), "model": result["model_id"]}


def run_offline(args: argparse.Namespace) -> dict:
    """The same requests through TokModel's offline LLM.chat in this process, all at once: the ceiling the
    server's own overhead is measured against."""
    from bench.datasets import random_requests
    from engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, top_p=1.0 if args.top_p is None else args.top_p,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    requests = random_requests(llm.get_tokenizer(), args.num_requests, PROMPT_LEN, args.max_tokens)  # as served
    conversations = [[{"role": "user", "content": r.prompt}] for r in requests]
    llm.chat(conversations[:1] * args.warmup, params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    duration = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"completed": len(outputs), "duration_s": round(duration, 3), "output_tokens": tokens,
            "output_tok_s": round(tokens / duration, 2)}


@contextmanager
def launched(kind: str, args: argparse.Namespace) -> Iterator[str]:
    """Starts one server on args.port with the default model's weights and args.dtype; stops it afterwards."""
    port = str(args.port)
    if kind == "tokmodel":
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", port,
                   "--dtype", args.dtype, *args.tokmodel_args.split()]
        if args.model:
            command += ["--model", args.model]
    elif kind == "llama.cpp":
        if not args.gguf:
            raise SystemExit("--launch llama.cpp needs --gguf")
        # Every CPU's thread, as TokModel's torch threads; a slot (and 512 tokens of context) per concurrent request.
        command = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", port, "--jinja",
                   "-t", str(os.cpu_count()), "-np", str(args.concurrency), "-c", str(args.concurrency * 512)]
    else:
        command = ["transformers", "serve", _model_dir(args), "--continuous-batching", "--host", "127.0.0.1",
                   "--port", port, "--device", "cpu", "--dtype", args.dtype]
    process = subprocess.Popen(command, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr)
    base_url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_wait_ready(base_url, process))
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=120)


def _model_dir(args: argparse.Namespace) -> str:
    """The converted checkpoint TokModel loads: transformers serves it, and it holds the tokenizer."""
    from engine.loader import resolve_model

    return str(resolve_model(args.model))


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
    parser.add_argument("--launch", action="append", default=[], choices=["tokmodel", "transformers", "llama.cpp"],
                        help="start this server, measure it, stop it (repeatable)")
    parser.add_argument("--model", help="for --launch (default: TokModel's default model)")
    parser.add_argument("--dtype", default="bfloat16", help="for --launch (default: bfloat16)")
    parser.add_argument("--tokmodel-args", default="", help="more flags for a launched tokmodel serve")
    parser.add_argument("--llama-server", default="llama-server", help="for --launch llama.cpp: its binary")
    parser.add_argument("--gguf", help="for --launch llama.cpp: the same weights as a GGUF")
    parser.add_argument("--port", type=int, default=8123, help="for --launch")
    parser.add_argument("--api-key")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    parser.add_argument("--temperature", type=float, default=0.0, help="of every request (default: 0, greedy)")
    parser.add_argument("--top-p", type=float, help="of every request (default: the server's)")
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
            # llama.cpp serves the GGUF's name: the bench reads the tokenizer from the checkpoint beside it
            tokenizer = _model_dir(args) if kind == "llama.cpp" else None
            report = asyncio.run(run_load(base_url, args, _extra(args, kind), tokenizer))
            reports.append({"server": kind, **config, "dtype": args.dtype, **report})
    rates = {r["server"]: r["output_tok_s"] for r in reports}
    if "offline" in rates and "tokmodel" in rates:
        reports.append({"server_overhead": round(1 - rates["tokmodel"] / rates["offline"], 4)})
    print(json.dumps(reports, indent=2))


def _extra(args: argparse.Namespace, kind: str) -> dict:
    return {"ignore_eos": True} if args.ignore_eos and kind in ("tokmodel", "llama.cpp") else {}


if __name__ == "__main__":
    main()
