"""`tokmodel profile`: a short workload under torch.profiler, in this process or in a running `tokmodel serve`
started with --profiler-config '{"profiler": "torch", "torch_profiler_dir": "DIR"}' (through POST /start_profile
and /stop_profile, as vLLM's), then the report of bench/trace_report.py: a Chrome/Perfetto trace, each step's split
between host and device, and a table per kernel and op with its roofline fraction against the limits measured here.

    tokmodel profile --num-prompts 8 --input-len 128 --output-len 32
    tokmodel profile --base-url http://127.0.0.1:8000   # the server's trace, in its torch_profiler_dir
"""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from bench.offline import add_offline_args, build_llm, offline_config


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    add_offline_args(parser)
    parser.add_argument("--base-url", help="profile this running tokmodel serve instead of an engine in this process; "
                        "the server must run on this machine (its trace is read from its torch_profiler_dir)")
    parser.add_argument("--num-prompts", type=int, default=8, help="requests in the profiled workload (default: 8)")
    parser.add_argument("--input-len", type=int, default=128, help="random prompt tokens each (default: 128)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens each, EOS ignored (default: 32)")
    parser.add_argument("--trace-dir", default="tokmodel-profile", help="where the trace goes, in process "
                        "(default: ./tokmodel-profile)")
    parser.add_argument("--row-limit", type=int, default=15, help="rows of the op table (default: 15)")
    parser.add_argument("--no-limits", action="store_true", help="skip measuring the device's copy bandwidth and "
                        "matmul throughput (no roofline fractions)")
    parser.add_argument("--output-json", help="also write the report here")


def run_profile(args: argparse.Namespace) -> dict:
    from bench.trace_report import analyze, print_report

    for flag in ("num_prompts", "input_len", "output_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    trace = profile_server(args) if args.base_url else profile_in_process(args)
    info = json.loads(Path(f"{trace}.steps.json").read_text())["model"]
    report = analyze(trace, None if args.no_limits else device_limits(info["device"], info["dtype"]), args.row_limit)
    print_report(report)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def profile_in_process(args: argparse.Namespace) -> Path:
    import numpy as np

    from engine import SamplingParams
    from engine.profiler import EngineProfiler

    llm = build_llm(offline_config(args))
    rng = np.random.default_rng(args.seed or 0)
    prompts = [{"prompt_token_ids": ids} for ids in
               rng.integers(0, llm.engine.vocab_size, (args.num_prompts, args.input_len)).tolist()]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    profiler = EngineProfiler(llm.engine, args.trace_dir)
    profiler.start()
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        trace = profiler.stop()
    return trace


def profile_server(args: argparse.Namespace) -> Path:
    """POST /start_profile, a `tokmodel bench serve` load of the same workload, POST /stop_profile."""
    from bench.serve import add_serve_args, run_serve

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    load = parser.parse_args(["--base-url", args.base_url, "--num-prompts", str(args.num_prompts),
                              "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                              "--ignore-eos", "--seed", str(args.seed or 0), "--disable-tqdm"])
    asyncio.run(_post(args.base_url, "/start_profile"))
    try:
        run_serve(load)
    finally:
        stopped = asyncio.run(_post(args.base_url, "/stop_profile"))
    return Path(stopped["trace"])


async def _post(base_url: str, path: str) -> dict:
    import aiohttp

    from bench.serve import BenchmarkError

    async with aiohttp.ClientSession() as session:
        async with session.post(base_url.rstrip("/") + path) as response:
            if response.status != 200:
                raise BenchmarkError(f"POST {path}: HTTP {response.status}: {(await response.text())[:200]} (is the "
                                     "server started with --profiler-config?)")
            return await response.json()


def device_limits(device: str, dtype: str):
    """Copy bandwidth and matmul throughput of this device, at sizes that take a second or two."""
    import torch

    from bench.roofline import measure_limits

    sizes = SimpleNamespace(copy_elements=2**28, matmul_size=8192) if device.startswith("cuda") else (
        SimpleNamespace(copy_elements=2**23, matmul_size=512))
    return measure_limits(device, sizes, getattr(torch, dtype))
