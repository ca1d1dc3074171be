"""`tokmodel bench latency`: one batch's latency in this process, as `vllm bench latency` (--batch-size prompts of
--input-len random tokens, --output-len tokens each, EOS ignored, --num-iters-warmup untimed then --num-iters
timed), with the two halves vLLM's report folds together: the prefill (until every request has its first token)
and each decode step. Prints one JSON object with vLLM's keys (avg_latency, latencies, percentiles) and ours."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.offline import add_offline_args, build_llm, offline_config

PERCENTILES = (10, 25, 50, 75, 90, 99)  # vLLM's


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    add_offline_args(parser)
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens per request (default: 32)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests in the batch (default: 8)")
    parser.add_argument("--num-iters-warmup", type=int, default=10, help="untimed runs of the batch (default: 10)")
    parser.add_argument("--num-iters", type=int, default=30, help="timed runs of the batch (default: 30)")
    parser.add_argument("--output-json", help="also write the JSON here")


def run_latency(args: argparse.Namespace) -> dict:
    from engine import SamplingParams

    for flag in ("input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    config = offline_config(args)
    llm = build_llm(config)
    rng = np.random.default_rng(args.seed or 0)
    prompts = rng.integers(0, llm.engine.vocab_size, (args.batch_size, args.input_len)).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    runs = [run_batch(llm.engine, prompts, params) for _ in range(args.num_iters_warmup + args.num_iters)]
    runs = runs[args.num_iters_warmup:]
    latencies = [r["latency"] for r in runs]
    steps_ms = 1000 * np.concatenate([r["decode_steps"] for r in runs])
    report = {"avg_latency": float(np.mean(latencies)), "latencies": latencies,
              "percentiles": {str(p): float(np.percentile(latencies, p)) for p in PERCENTILES},
              "prefill_ms": _stats(1000 * np.asarray([r["prefill"] for r in runs])),
              "decode_step_ms": _stats(steps_ms), "num_decode_steps": len(steps_ms),
              "config": {"model": config.model or "default", "load_format": config.load_format,
                         "device": config.device, "dtype": config.dtype, "batch_size": args.batch_size,
                         "input_len": args.input_len, "output_len": args.output_len, "num_iters": args.num_iters}}
    print(json.dumps(report, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def run_batch(engine, prompts: list[list[int]], params) -> dict:
    """One batch through the engine, step by step: seconds to the last first token, then each decode step.
    A step returns after tokens reach the host (with async scheduling, CUDA's default, the step before's), so in
    steady state its wall time is one token's, the device's work included."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"latency-{time.monotonic_ns()}-{i}", prompt, params)
    start = time.perf_counter()
    started, prefill, steps = set(), 0.0, []
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        if len(started) == len(prompts):
            steps.append(time.perf_counter() - step_start)
        started |= {o.request_id for o in outputs}
        if not prefill and len(started) == len(prompts):
            prefill = time.perf_counter() - start
    return {"latency": time.perf_counter() - start, "prefill": prefill, "decode_steps": steps}


def _stats(ms: np.ndarray) -> dict:
    return {"mean": float(ms.mean())} | {f"p{p}": float(np.percentile(ms, p)) for p in (50, 90, 99)}
