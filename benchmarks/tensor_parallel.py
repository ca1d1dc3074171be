"""Tensor parallelism on the CPU: what it costs, not what it gains (the ranks share the machine's cores).

1. Decode throughput of TP=2 (gloo, one thread per rank) against TP=1 (two threads) on random weights of a
   shortened Qwen3-0.6B (16 heads, 8 KV heads; --layers of its 28), a batch of --num-seqs greedy sequences.
2. The per-step broadcast: rank 0 hands the SchedulerOutput of a decode step of 256 sequences with 1024-token
   contexts (64 blocks each, each given a new block) to a worker through shared memory (engine/worker.py
   StepChannel): the send on rank 0's critical path (pickle, copy, events), and the round trip to a worker process
   that unpickles it and answers. Goal: under 1 ms.

    python benchmarks/tensor_parallel.py

Prints one JSON object and writes it to benchmarks/results/tensor-parallel-cpu-<date>.json. Figures are medians.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere in the checkout

from bench.common import default_result_path, machine_info, save_json  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.loader import config_file_dir  # noqa: E402
from engine.scheduler import SchedulerOutput  # noqa: E402
from engine.worker import StepChannel  # noqa: E402

CONFIG = REPO / "bench" / "configs" / "qwen3-0.6b.json"
BROADCAST_SEQS, BROADCAST_BLOCKS, BLOCK_SIZE = 256, 64, 16


def shortened_config(layers: int) -> Path:
    """A model directory (in the loader's cache) of the config with `layers` layers."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"qwen3-0.6b-{layers}-layers.json"
        path.write_text(json.dumps(json.loads(CONFIG.read_text()) | {"num_hidden_layers": layers}))
        return config_file_dir(path)


def decode_throughput(model_dir: Path, tensor_parallel_size: int, threads: int, num_seqs: int, output_len: int,
                      repeats: int) -> dict:
    torch.set_num_threads(threads)  # rank 0 (and TP=1); each worker takes its share of the cores itself
    llm = LLM(model=str(model_dir), load_format="dummy", dtype="float32", tensor_parallel_size=tensor_parallel_size,
              max_model_len=512, kv_cache_memory_bytes=1 << 30)
    prompts = [[(i * 7 + j) % 1000 + 10 for j in range(32)] for i in range(num_seqs)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
    finally:
        llm.engine.shutdown()
    seconds = statistics.median(times)
    return {"tensor_parallel_size": tensor_parallel_size, "threads_per_rank": max(1, threads // tensor_parallel_size)
            if tensor_parallel_size > 1 else threads, "seconds": round(seconds, 3),
            "output_tokens_per_s": round(num_seqs * output_len / seconds, 1)}


def decode_step(num_seqs: int, blocks_per_seq: int) -> SchedulerOutput:
    """What rank 0 sends for a decode step of num_seqs held sequences, each with blocks_per_seq blocks of context
    and one new block id (the worst case: every sequence crossing into a new block at once)."""
    req_ids = [f"cmpl-{i:032x}" for i in range(num_seqs)]  # as long as the server's request ids
    context = blocks_per_seq * BLOCK_SIZE
    return SchedulerOutput(req_ids, [1] * num_seqs, [context - 1] * num_seqs, list(range(num_seqs)), [],
                           [(req_id, blocks_per_seq - 1, [i]) for i, req_id in enumerate(req_ids)], [],
                           list(req_ids), list(range(num_seqs)), [], [])


def echo_worker(channel: StepChannel, ack) -> None:
    """Receives each step (unpickling it, as a worker does) and answers, until told to stop."""
    while (call := channel.receive(1)) is not None and call[0] != "shutdown":
        ack.set()


def broadcast_cost(iterations: int) -> dict:
    context = multiprocessing.get_context("spawn")
    step = decode_step(BROADCAST_SEQS, BROADCAST_BLOCKS)
    channel = StepChannel([context.Event()], 16 << 20)
    ack = context.Event()
    worker = context.Process(target=echo_worker, args=(channel, ack), daemon=True)
    worker.start()
    sends, round_trips = [], []
    try:
        for _ in range(iterations):
            start = time.perf_counter()
            channel.send("execute_model", step, True, ())
            sent = time.perf_counter()
            ack.wait()
            done = time.perf_counter()
            ack.clear()
            sends.append(sent - start)
            round_trips.append(done - start)
        channel.send("shutdown")
        worker.join(timeout=10)
    finally:
        channel.close(unlink=True)
    size = len(pickle.dumps(("execute_model", (step, True, ())), protocol=pickle.HIGHEST_PROTOCOL))
    return {"num_seqs": BROADCAST_SEQS, "context_tokens": BROADCAST_BLOCKS * BLOCK_SIZE, "message_bytes": size,
            "send_ms": round(1e3 * statistics.median(sends), 3),
            "round_trip_ms": round(1e3 * statistics.median(round_trips), 3),
            "round_trip_p90_ms": round(1e3 * statistics.quantiles(round_trips, n=10)[-1], 3), "goal_ms": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-seqs", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="cores for TP=1; TP=2 gives each rank half")
    parser.add_argument("--broadcast-iterations", type=int, default=500)
    parser.add_argument("--out", type=Path, default=default_result_path("tensor-parallel", "cpu"))
    args = parser.parse_args()
    report = {"machine": machine_info("cpu"), "broadcast": broadcast_cost(args.broadcast_iterations)}
    model_dir = shortened_config(args.layers)
    report["model"] = f"{CONFIG.relative_to(REPO)} with {args.layers} layers, random weights, float32"
    report["decode"] = [decode_throughput(model_dir, tp, args.threads, args.num_seqs, args.output_len, args.repeats)
                        for tp in (1, 2)]
    print(json.dumps(report, indent=2))
    save_json(report, args.out)


if __name__ == "__main__":
    main()
