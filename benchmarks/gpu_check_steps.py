"""The steps of benchmarks/gpu_check.py. Each runs in its own process (a step cannot hold another's GPU memory or
compiled kernels, and a hung one can be stopped), takes the plan and a work directory shared by the steps (the
random-weight models, built once), and returns {"figures": ..., "goals": [...]}, plus "error" when it failed
after measuring something (failing tests)."""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.gpu_check_plan import CONFIGS, Plan
from benchmarks.gpu_check_report import goal

REPO = Path(__file__).resolve().parents[1]
STARTED_ENV = "GPU_CHECK_STARTED"  # the orchestrator's start (CLOCK_MONOTONIC is one clock for all processes)
STARTED = float(os.environ.get(STARTED_ENV, time.monotonic()))


def log(message: str) -> None:
    print(f"[gpu_check +{time.monotonic() - STARTED:5.1f}s] {message}", file=sys.stderr, flush=True)


# ---- 1. the CUDA tests ----

def run_tests(plan: Plan, work_dir: Path) -> dict:
    """pytest in a subprocess, its output shown as it runs; the JUnit report gives the counts and failures."""
    junit = work_dir / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *plan.pytest_args]
    log(" ".join(command[1:]))
    subprocess.run(command, cwd=REPO, stdout=sys.stderr)
    root = ElementTree.parse(junit).getroot()
    counts = Counter()
    for suite in root.iter("testsuite"):
        counts.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
    failed = [f"{case.get('classname')}::{case.get('name')}: {(problem.get('message') or '')[:200]}"
              for case in root.iter("testcase") for problem in case if problem.tag in ("failure", "error")]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    figures = {"pytest_args": list(plan.pytest_args), "passed": passed, "failed": counts["failures"],
               "errors": counts["errors"], "skipped": counts["skipped"], "failures": failed[:20]}
    result = {"figures": figures, "goals": [goal("tests failing", len(failed), 0, at_most=True, on_hardware=False,
                                                 detail=f"of {counts['tests']}")]}
    if failed or passed == 0:
        result["error"] = f"{len(failed)} of {counts['tests']} tests failed" if failed else "no test passed"
    return result


# ---- 2. kernel figures ----

def run_kernels(plan: Plan, work_dir: Path) -> dict:
    from benchmarks import kernels as bench
    from kernels import get_ops

    limits = bench.measure_limits(plan.device, plan.kernel_sweep, plan.kernel_dtype)
    log(f"copy bandwidth {limits.copy_bw_gbps:.0f} GB/s, matmul {limits.matmul_tflops:.1f} TFLOP/s")
    setup = bench.Setup(get_ops("triton"), plan.kernel_dtype, plan.device, plan.kernel_shape, plan.kernel_sweep, limits)
    records = bench.bench_all(setup, log)
    min_batch, min_context = plan.decode_goal_from
    decode = [r for r in records if r["kernel"] == "paged_decode_attention"
              and r["batch"] >= min_batch and r["context_len"] >= min_context]
    worst_decode = min(decode, key=lambda r: r["frac_of_copy_bw"])
    (prefill,) = [r for r in records if r["kernel"] == "prefill_attention"]
    largest = max(plan.kernel_sweep.elementwise_tokens)
    fused = [r for r in records if r["kernel"] in ("rms_norm", "rotary_embedding_and_write_kv", "silu_and_mul")
             and r["batch"] == largest]
    worst_fused = min(fused, key=lambda r: r["frac_of_copy_bw"])
    goals = [
        goal("decode attention / copy bandwidth", worst_decode["frac_of_copy_bw"], 0.8,
             detail=f"worst over batch >= {min_batch}, context >= {min_context}: batch {worst_decode['batch']}, "
                    f"context {worst_decode['context_len']}"),
        goal("prefill attention / SDPA flash", prefill["frac_of_sdpa"], 0.6,
             detail=f"TFLOP/s, one {prefill['context_len']}-token prompt"),
        # At a decode batch's few tokens an op moves a few MB, and its launch's fixed cost dominates: reported,
        # held to the goal at a prefill chunk's size only.
        goal("fused ops / copy bandwidth", worst_fused["frac_of_copy_bw"], 0.8,
             detail=f"worst at {largest} tokens: {worst_fused['kernel']}"),
    ]
    # The fused MoE's figures stand apart from the goals above: the issue asks for its fractions, not a target.
    moe = bench.bench_fused_moe(setup, plan.moe_shapes, log)
    for r in moe:
        log(f"fused MoE {r['model']}, {r['batch']} tokens: {r['frac_of_copy_bw']:.2f} of copy bandwidth, "
            f"{r['tflops']:.1f} TFLOP/s ({r['frac_of_matmul']:.2f} of matmul)")
    split_choice = {}
    for r in records:
        if r["kernel"] == "decode_attention_splits":
            case = split_choice.setdefault(f"batch {r['batch']}, {r['context_len']} keys", {"time_us": {}})
            case["time_us"][r["num_splits"]] = r["time_us"]
            if r["eager_choice"]:
                case["eager_choice"] = r["num_splits"]
    for name, case in split_choice.items():
        times = case["time_us"]
        case["fastest"] = min(times, key=times.get)
        log(f"decode attention at {name}: fastest with {case['fastest']} splits ({times[case['fastest']]:.1f} us), "
            f"eager steps pick {case['eager_choice']} ({times[case['eager_choice']]:.1f} us); "
            + ", ".join(f"{n}: {us:.1f}" for n, us in times.items()))
    figures = {"copy_bw_gbps": limits.copy_bw_gbps, "matmul_tflops": limits.matmul_tflops,
               "shape": plan.kernel_shape._asdict(), "dtype": str(plan.kernel_dtype).removeprefix("torch."),
               "records": records, "fused_moe": moe, "decode_split_choice": split_choice,
               "gemv_vs_cublas": _gemv_vs_cublas(records)}
    return {"figures": figures, "goals": goals}


def _gemv_vs_cublas(records: list[dict]) -> dict:
    """Per dense layer and decode batch: cuBLAS's time, kernels/gemv.py's best config and its time, cuBLAS's time
    over it (above 1: gemv is faster), and how far gemv's output is from cuBLAS's."""
    summary = {}
    for r in records:
        if r["kernel"] in ("linear_cublas", "gemv"):
            case = summary.setdefault(f"{r['layer']} {r['n']}x{r['k']}, {r['batch']} rows", {})
            if r["kernel"] == "linear_cublas":
                case["cublas_us"] = r["time_us"]
            elif r["time_us"] < case.get("gemv_us", float("inf")):
                case.update(gemv_us=r["time_us"], gemv_config=r["config"], gemv_max_abs_diff=r["max_abs_diff"],
                            gemv_frac_of_copy_bw=r["frac_of_copy_bw"])
    for name, case in summary.items():
        case["speedup"] = case["cublas_us"] / case["gemv_us"]
        log(f"decode matmul {name}: cuBLAS {case['cublas_us']:.1f} us, gemv {case['gemv_us']:.1f} us "
            f"({case['gemv_frac_of_copy_bw']:.2f} of copy bandwidth; {case['speedup']:.2f}x), "
            f"max |diff| {case['gemv_max_abs_diff']:.3g}, {case['gemv_config']}")
    return summary


# ---- 3. end to end ----

def run_throughput(plan: Plan, work_dir: Path) -> dict:
    """nano-vllm's workload through TokModel and transformers' generate_batch, on the same random weights.
    generate_batch runs in its own process with what is left of the step's time: on an H200 it did not finish 64
    requests in 140 s, and an unfinished peer still bounds the ratio from below."""
    from transformers import AutoConfig

    from benchmarks import throughput

    started = time.monotonic()
    model_dir = qwen3_dir(plan, work_dir)
    w = plan.throughput
    argv = ["--model", str(model_dir), "--device", plan.device, "--dtype", plan.dtype,
            "--num-prompts", str(w.num_prompts),
            "--input-len-min", str(w.input_len[0]), "--input-len-max", str(w.input_len[1]),
            "--output-len-min", str(w.output_len[0]), "--output-len-max", str(w.output_len[1])]
    report = throughput.main([*argv, "--peers", "tokmodel"])
    workload = throughput.make_workload(throughput.parse_args(argv), AutoConfig.from_pretrained(model_dir).vocab_size)
    ours = report["results"]["tokmodel"]
    # Leave the step a margin to write its result before the orchestrator's limit.
    deadline = started + plan.step_time_limit_s["throughput"] - 25
    theirs = _peer_throughput([*argv, "--peers", "hf-generate-batch"], "hf-generate-batch", deadline, work_dir)
    useful = workload.num_output_tokens
    figures = {"model": "Qwen3-0.6B shape, random weights", "workload": report["workload"],
               "tokmodel": ours, "hf_generate_batch": theirs,
               "note": "output tok/s counts each request's own output length; generate_batch takes one "
                       "max_new_tokens, so it computes every request to the longest output "
                       "(computed_output_tokens_per_s), and builds (on CUDA: captures the graphs of) its batching "
                       "manager in every call, as a user of it pays (benchmarks/throughput.py)"}
    if "output_tokens_per_s" in theirs:
        figures["speedup_useful_tokens"] = ours["output_tokens_per_s"] / theirs["output_tokens_per_s"]
        # generate_batch takes one max_new_tokens, so every request runs to the workload's longest output.
        computed = len(workload.prompts) * max(workload.output_lens)
        figures["hf_generate_batch_computed_output_tokens_per_s"] = computed / theirs["elapsed_s"]
        detail = f"useful output tok/s, {len(workload.prompts)} requests"
    elif "timed_s" in theirs:
        # Unfinished after timed_s of timing: it made fewer than `useful` tokens in that time.
        figures["hf_generate_batch_output_tokens_per_s_at_most"] = useful / theirs["timed_s"]
        figures["speedup_useful_tokens_at_least"] = (ours["output_tokens_per_s"]
                                                     / figures["hf_generate_batch_output_tokens_per_s_at_most"])
        detail = (f"a lower bound: generate_batch had not finished {len(workload.prompts)} requests after "
                  f"{theirs['timed_s']:.0f} s of timing")
    else:
        detail = "generate_batch did not reach its timed run"
    value = figures.get("speedup_useful_tokens", figures.get("speedup_useful_tokens_at_least"))
    return {"figures": figures,
            "goals": [goal("throughput / transformers generate_batch", value, 3.0, detail=detail)]}


def _peer_throughput(argv: list[str], peer: str, deadline: float, work_dir: Path) -> dict:
    """benchmarks/throughput.py for one peer in a child process, stopped at the deadline. Its result, or how long
    its timed run had been going when it was stopped (from the moment it logged "timing")."""
    output = work_dir / f"throughput-{peer}.json"
    command = [sys.executable, "-m", "benchmarks.throughput", *argv, "--output", str(output)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    timing_since: list[float] = []

    def follow() -> None:  # echo its log, and note when its timed run begins
        for line in process.stderr:
            sys.stderr.write(line)
            if f"{peer}: timing" in line:
                timing_since.append(time.monotonic())

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log(f"{peer}: stopped at the step's deadline")
        return {"finished": False} | ({"timed_s": round(time.monotonic() - timing_since[0], 1)} if timing_since else {})
    finally:
        reader.join(timeout=5)
    if process.returncode != 0 or not output.exists():
        raise RuntimeError(f"{peer} exited with {process.returncode}")
    return json.loads(output.read_text())["results"][peer]


def run_decode_latency(plan: Plan, work_dir: Path) -> dict:
    """Batch-1 decode on the Llama-3.1-8B shape: seconds per step against the time to stream the weights a
    decode step reads once (all but the embedding table, of which it reads one row) at the copy bandwidth."""
    import torch

    from benchmarks.kernels import copy_bandwidth_gbps
    from engine import LLM
    from engine.layers.linear import dense_layers
    from kernels import gemv

    copy_gbps = copy_bandwidth_gbps(plan.device, plan.kernel_sweep.copy_elements)
    llm = LLM(model=str(shape_config(plan, work_dir, "llama-3.1-8b")), load_format="dummy", device=plan.device,
              dtype=plan.dtype)
    model = llm.engine.runner.model
    streamed = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        streamed -= model.model.embed_tokens.weight.nbytes
    step_s = _decode_step_seconds(llm, plan)
    median_ms = 1e3 * float(np.median(step_s))
    floor_ms = 1e3 * streamed / (copy_gbps * 1e9)
    log(f"{median_ms:.2f} ms per token, weight-streaming floor {floor_ms:.2f} ms")
    # The same decode again under the profiler (which slows the host, so it is not the timed run): how much of a
    # token the device works, which says whether the rest of the gap to the floor is the host's or the kernels'.
    _start_decode(llm, plan, "decode-profiled")
    profile = _profiled(llm.engine, work_dir / "decode-latency-trace")
    device_ms = profile["step_ms_mean"] * profile["step_split"]["device_busy_pct"] / 100
    log(f"under the profiler: device busy {profile['step_split']['device_busy_pct']:.1f}% of a step, "
        f"{device_ms:.2f} ms a token ({device_ms / floor_ms:.2f}x the floor)")
    # Where the device's token goes, kernel by kernel: what the next cut of the gap to the floor should aim at.
    device_ops = [{"name": op["name"][:100], "us_per_token": 1e3 * op["total_ms"] / profile["steps"],
                   "mean_us": op["mean_us"], "calls_per_token": op["calls"] / profile["steps"]}
                  for op in profile["ops"]]
    for op in device_ops:
        log(f"  {op['us_per_token']:8.1f} us a token  {op['calls_per_token']:5.0f} x {op['mean_us']:6.2f} us  "
            f"{op['name'][:60]}")
    # What the warm-up chose for each matmul (kernels/gemv.py or cuBLAS): tune's rows, cached, returned again.
    matmuls = [row | {"chosen": row["chosen"] and row["chosen"]._asdict()} for row in gemv.tune(dense_layers(model))]
    for row in matmuls:
        log(f"  decode matmul {row['n']}x{row['k']} at {row['rows']} rows: cuBLAS {row['cublas_us']:.1f} us, gemv "
            f"{row['gemv_us'] or float('nan'):.1f} us: {'gemv' if row['chosen'] else 'cuBLAS'}")
    # The dry run takes this path too (nothing to drop there), so that a GPU run never meets it untried.
    without_gemv = plan.is_dry_run or any(row["chosen"] for row in matmuls)
    without_gemv_ms = _decode_ms_without_gemv(llm, plan) if without_gemv else None
    figures = {"model": "Llama-3.1-8B shape, dummy weights", "dtype": plan.dtype, "prompt_len": plan.decode_prompt_len,
               "decode_steps": len(step_s), "ms_per_token_median": median_ms,
               "ms_per_token_mean": 1e3 * float(np.mean(step_s)), "streamed_weight_bytes": streamed,
               "copy_bw_gbps": copy_gbps, "floor_ms": floor_ms, "floor_over_actual": floor_ms / median_ms,
               "profiled": {"step_ms_mean": profile["step_ms_mean"], "step_split": profile["step_split"],
                            "device_ms_per_token": device_ms, "device_over_floor": device_ms / floor_ms,
                            "device_ops": device_ops},
               "decode_matmuls": matmuls, "ms_per_token_median_without_gemv": without_gemv_ms,
               "torch_threads": torch.get_num_threads()}
    return {"figures": figures,
            "goals": [goal("batch-1 decode / weight-streaming floor", median_ms / floor_ms, 1.25, at_most=True,
                           detail=f"Llama-3.1-8B shape, median of {len(step_s)} tokens; the device alone "
                           f"{device_ms / floor_ms:.2f}x (profiled)")]}


def _decode_ms_without_gemv(llm, plan: Plan) -> float:
    """The same timed decode with the CUDA graphs captured again on cuBLAS alone (the warm-up's gemv choices
    dropped): what gemv gave batch 1, measured in the same run. The choices stay dropped after it."""
    from engine.cuda_graphs import DecodeGraphs
    from kernels import gemv

    runner = llm.engine.runner
    gemv.forget_choices()
    runner.graphs = DecodeGraphs(runner.graphs.sizes)
    runner.capture_cuda_graphs()
    median_ms = 1e3 * float(np.median(_decode_step_seconds(llm, plan)))
    log(f"without gemv (graphs captured again on cuBLAS): {median_ms:.2f} ms per token")
    return median_ms


def _decode_step_seconds(llm, plan: Plan) -> list[float]:
    """Seconds of each step of one batch-1 greedy decode of plan.decode_tokens tokens."""
    _start_decode(llm, plan, "decode")
    step_s = []
    while llm.engine.has_unfinished_requests():
        start = time.perf_counter()
        llm.engine.step()  # a token to the host: this step's, or with async scheduling (CUDA's default) the last's
        step_s.append(time.perf_counter() - start)
    return step_s


def _start_decode(llm, plan: Plan, request_id: str) -> None:
    """A batch-1 greedy request of plan.decode_tokens tokens, past its prefill."""
    from engine import SamplingParams

    prompt = np.random.default_rng(0).integers(0, llm.engine.vocab_size, plan.decode_prompt_len).tolist()
    llm.engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=plan.decode_tokens + 1,
                                                              ignore_eos=True))
    llm.engine.step()  # the prefill and its token (which async scheduling hands over with the next call)


def _profiled(core, trace_dir: Path, num_steps: int | None = None) -> dict:
    """num_steps engine steps (None: until no request is left) under EngineProfiler: bench.trace_report's analysis
    of their trace."""
    from bench.trace_report import analyze
    from engine.profiler import EngineProfiler

    profiler = EngineProfiler(core, trace_dir)
    profiler.start()
    try:
        for _ in itertools.count() if num_steps is None else range(num_steps):
            if not core.has_unfinished_requests():
                break
            core.step()
    finally:
        trace = profiler.stop()
    return analyze(trace, None)


def run_tensor_parallel(plan: Plan, work_dir: Path) -> dict:
    """Batch-1 decode on the Llama-3.1-8B shape with TP=2 (NCCL) against TP=1. Needs two GPUs: with fewer (the
    CPU dry run included) it says so and passes; tests/test_tensor_parallel.py covers TP on the CPU."""
    import gc

    import torch

    from engine import LLM

    num_gpus = torch.cuda.device_count() if plan.device.startswith("cuda") else 0
    if num_gpus < 2:
        log(f"skipped: {num_gpus} GPUs, TP=2 needs 2")
        return {"figures": {"skipped": f"{num_gpus} GPUs; TP=2 needs 2"}, "goals": []}
    figures = {"model": "Llama-3.1-8B shape, dummy weights", "dtype": plan.dtype}
    for tp in (1, 2):
        llm = LLM(model=str(shape_config(plan, work_dir, "llama-3.1-8b")), load_format="dummy", device=plan.device,
                  dtype=plan.dtype, tensor_parallel_size=tp)
        figures[f"tp{tp}_ms_per_token_median"] = 1e3 * float(np.median(_decode_step_seconds(llm, plan)))
        llm.engine.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    figures["speedup"] = figures["tp1_ms_per_token_median"] / figures["tp2_ms_per_token_median"]
    log(f"TP=1 {figures['tp1_ms_per_token_median']:.2f} ms/token, TP=2 {figures['tp2_ms_per_token_median']:.2f}")
    return {"figures": figures, "goals": []}


def run_serving(plan: Plan, work_dir: Path) -> dict:
    """`tokmodel serve` on the Qwen3-0.6B shape (random weights, a stand-in tokenizer), loaded by streaming
    chat clients as benchmarks/serving.py does."""
    from benchmarks import serving

    if importlib.util.find_spec("prometheus_client") is None:  # else the server dies with one line in the log
        raise RuntimeError("tokmodel serve imports prometheus_client (server/metrics.py), which is not installed")
    num_requests, concurrency, max_tokens = plan.serving
    args = argparse.Namespace(model=str(qwen3_dir(plan, work_dir)), dtype=plan.dtype, port=_free_port(),
                              tokmodel_args="", api_key=None, num_requests=num_requests, concurrency=concurrency,
                              max_tokens=max_tokens, warmup=2, temperature=0.0, top_p=None)
    with serving.launched("tokmodel", args) as base_url:
        log(f"server up at {base_url}: {num_requests} requests, {concurrency} at a time")
        figures = asyncio.run(serving.run_load(base_url, args, {"ignore_eos": True}))
    figures |= {"num_requests": num_requests, "concurrency": concurrency, "max_tokens": max_tokens}
    return {"figures": figures,
            "goals": [goal("served requests failing", num_requests - figures["completed"], 0, at_most=True,
                           on_hardware=False, detail=f"of {num_requests}")]}


# ---- 4. compile stalls ----

def run_compile_stalls(plan: Plan, work_dir: Path) -> dict:
    """An engine on the Triton kernels warms up at start; then batches of every size and length must compile
    nothing. Counted on a GPU by Triton's caches of compiled variants; in the dry run (the interpreter compiles
    nothing) by the variants an H100 would compile for the launches made."""
    from engine import LLM, SamplingParams

    with _variant_counter(plan) as count:
        llm = LLM(model=str(shape_config(plan, work_dir, "qwen3-0.6b")), load_format="dummy", device=plan.device,
                  dtype=plan.dtype, kernel_backend="triton", **plan.compile_engine_args)
        warm = count()
        log(f"after warm-up: {sum(warm.values())} variants {warm}")
        rng = np.random.default_rng(0)
        vocab = llm.engine.vocab_size
        for wave in plan.compile_waves:
            lens = rng.integers(wave.prompt_len[0], wave.prompt_len[1] + 1, wave.num_prompts)
            prompts = [rng.integers(0, vocab, n).tolist() for n in lens]
            prompts += [prompts[0] + [1, 2, 3]]  # a prefix-cache hit: a prefill after cached blocks
            params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=int(n))
                      for n in rng.integers(wave.output_len[0], wave.output_len[1] + 1, len(prompts))]
            log(f"{len(prompts)} prompts of {lens.min()}-{lens.max()} tokens")
            llm.generate(prompts, params, use_tqdm=False)
        after = count()
    new = {name: after[name] - warm.get(name, 0) for name in after if after[name] != warm.get(name, 0)}
    figures = {"counted": "compiled variants (Triton's caches)" if not plan.is_dry_run else
               "variants an H100 would compile for the launches made (the interpreter compiles nothing)",
               "after_warm_up": warm, "after_varied_run": after, "new": new,
               "waves": [w._asdict() for w in plan.compile_waves]}
    result = {"figures": figures,
              "goals": [goal("compilations after warm-up", sum(new.values()), 0, at_most=True, on_hardware=False,
                             detail=f"{len(plan.compile_waves)} waves of varied batches"
                                    if not new else f"new: {new}")]}
    if not warm:
        result["error"] = "no kernel variant counted after warm-up: has Triton's JIT cache moved?"
    return result


# ---- 5. the fast path: the same tokens on every decode path ----

def run_fast_path(plan: Plan, work_dir: Path) -> dict:
    """Greedy requests on random-weight Qwen3 and Llama models, in fp32 (so that a different split of decode
    attention cannot flip a near tie), through eager decode, through CUDA-graph decode (in the dry run: the
    graph path's padding and static buffers, run eagerly) and through CUDA-graph decode with async scheduling
    (the next step's inputs read from the last step's sampled ids on the device); every request must get the
    same tokens."""
    from benchmarks.random_model import random_model_dir
    from engine import LLM, SamplingParams

    check = plan.fast_path
    graphs = {"eager_graph_padding": True} if plan.is_dry_run else {"enforce_eager": False}
    models = {"qwen3": qwen3_dir(plan, work_dir),
              "llama": random_model_dir(CONFIGS / "llama-3.1-8b.json", work_dir / "llama-small", check.llama_overrides)}
    figures, goals = {}, []
    for name, model_dir in models.items():
        tokens, captured = {}, 0
        paths = (("eager", {"enforce_eager": True, "async_scheduling": False}),
                 ("graphs", graphs | {"async_scheduling": False}), ("async", graphs | {"async_scheduling": True}))
        for path, engine_args in paths:
            llm = LLM(model=str(model_dir), device=plan.device, dtype="float32", max_num_seqs=check.max_num_seqs,
                      **engine_args)
            vocab = llm.engine.vocab_size
            rng = np.random.default_rng(0)
            prompts = [rng.integers(0, vocab, n).tolist()
                       for n in rng.integers(check.prompt_len[0], check.prompt_len[1] + 1, check.num_prompts)]
            params = SamplingParams(temperature=0, max_tokens=check.max_tokens, ignore_eos=True)
            tokens[path] = [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
            captured = max(captured, llm.engine.runner.graphs.num_captured)
            del llm
        same = sum(a == b for a, b in zip(tokens["eager"], tokens["graphs"]))
        same_async = sum(a == b for a, b in zip(tokens["graphs"], tokens["async"]))
        log(f"{name}: graph decode gives eager's tokens for {same} of {check.num_prompts} requests, async "
            f"scheduling the synchronous loop's for {same_async}")
        figures[name] = {"requests": check.num_prompts, "identical_graphs_vs_eager": same,
                         "identical_async_vs_sync": same_async, "graphs_captured": captured}
        goals.append(goal(f"{name}: requests whose graph decode differs from eager", check.num_prompts - same, 0,
                          at_most=True, on_hardware=False, detail=f"of {check.num_prompts}, greedy fp32"))
        goals.append(goal(f"{name}: requests whose async-scheduled tokens differ from synchronous",
                          check.num_prompts - same_async, 0, at_most=True, on_hardware=False,
                          detail=f"of {check.num_prompts}, greedy fp32, both with graph decode"))
        if not plan.is_dry_run:  # a failed capture falls back to eager decode, which would match trivially
            goals.append(goal(f"{name}: CUDA graphs captured", captured, 1, detail="decode batch sizes"))
    return {"figures": figures, "goals": goals}


def run_idle_time(plan: Plan, work_dir: Path) -> dict:
    """Decode steps of a full batch on the Qwen3-0.6B shape (CUDA graphs on) under torch.profiler, every request
    past its prefill: the share of the steps' wall time the device is busy (kernels and copies). What remains is
    the host's time the device waits through: scheduling, input preparation, sampling, output processing. First
    with the synchronous loop, as a figure; then with async scheduling, the default on CUDA (switched on between
    steps: the engine then overlaps the host's work on one step's outputs with the next step's forward), judged."""
    from engine import LLM, SamplingParams

    batch, prompt_len, decode_steps = plan.idle_time
    llm = LLM(model=str(qwen3_dir(plan, work_dir)), device=plan.device, dtype=plan.dtype, max_num_seqs=batch,
              async_scheduling=False)
    core = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=2 * decode_steps + 8, ignore_eos=True)
    for index, ids in enumerate(rng.integers(0, core.vocab_size, (batch, prompt_len)).tolist()):
        core.add_request(str(index), {"prompt_token_ids": ids}, params)
    while core.scheduler.waiting or len(core.scheduler.running) < batch:
        core.step()
    core.step()  # the last prefill's request decodes too: every step from here is decode-only

    report = _profiled(core, work_dir / "idle-time-trace", decode_steps)
    core.async_scheduling = True  # safe between steps in this direction (nothing is pending yet), never back
    overlapped = _profiled(core, work_dir / "idle-time-trace-async", decode_steps)
    busy, busy_async = report["step_split"]["device_busy_pct"], overlapped["step_split"]["device_busy_pct"]
    log(f"decode at batch {batch}: step {report['step_ms_mean']:.2f} ms, device busy {busy:.1f}%; with async "
        f"scheduling {overlapped['step_ms_mean']:.2f} ms, busy {busy_async:.1f}%")
    figures = {"batch": batch, "prompt_len": prompt_len, "steps": report["steps"],
               "step_ms_mean": report["step_ms_mean"], "step_split": report["step_split"],
               "async_scheduling": {"step_ms_mean": overlapped["step_ms_mean"], "step_split": overlapped["step_split"]}}
    return {"figures": figures,
            "goals": [goal("device idle share of decode steps (%)", 100 - busy_async, 10, at_most=True,
                           detail=f"batch {batch}, {overlapped['steps']} steps under torch.profiler, async "
                           f"scheduling (synchronous: {100 - busy:.1f}%)")]}


@contextmanager
def _variant_counter(plan: Plan) -> Iterator[Callable[[], dict[str, int]]]:
    """A function giving kernel name -> variants so far."""
    if not plan.is_dry_run:
        from kernels import compile_count

        yield lambda: {name: n for name, n in compile_count.compiled_variants().items() if n}
        return
    from tests.kernel_launches import recorded_launches

    with recorded_launches(then_run=True) as launches:
        yield lambda: dict(Counter(name for name, *_ in launches))


# ---- models ----

def qwen3_dir(plan: Plan, work_dir: Path) -> Path:
    """A HF directory of the Qwen3-0.6B shape with random weights and a stand-in tokenizer, built once a run."""
    from benchmarks.random_model import random_model_dir
    from engine.config import EngineConfig

    dtype = EngineConfig(device=plan.device, dtype=plan.dtype).torch_dtype
    log("building the Qwen3-0.6B-shaped model directory (random weights) unless built already")
    return random_model_dir(CONFIGS / "qwen3-0.6b.json", work_dir / "qwen3-0.6b", plan.model_overrides, dtype,
                            with_tokenizer=True)


def shape_config(plan: Plan, work_dir: Path, name: str) -> Path:
    """configs/<name>.json with the plan's overrides, for load_format="dummy"."""
    import json

    path = work_dir / f"{name}.json"
    path.write_text(json.dumps(json.loads((CONFIGS / f"{name}.json").read_text()) | plan.model_overrides))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STEPS: dict[str, Callable[[Plan, Path], dict]] = {
    "tests": run_tests, "kernels": run_kernels, "throughput": run_throughput, "decode_latency": run_decode_latency,
    "serving": run_serving, "compile_stalls": run_compile_stalls, "fast_path": run_fast_path,
    "tensor_parallel": run_tensor_parallel, "idle_time": run_idle_time,
}
