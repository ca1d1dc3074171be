"""What a profile of the engine says (engine/profiler.py's Chrome trace and its steps file): where each step's time
goes between the host (scheduling, input preparation, sampling, detokenization) and the device, and per kernel or
op its calls, total and mean time and share of the steps; for TokModel's kernels also the bandwidth and FLOP/s
they achieved against the device's measured limits (their roofline fraction: the larger of the two)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from bench.roofline import (Limits, Traffic, decode_traffic, embedding_traffic, linear_traffic, prefill_traffic,
                            rms_norm_traffic, rotary_write_kv_traffic, silu_and_mul_traffic)
from engine.profiler import KERNEL_PREFIX

HOST_PHASES = ("schedule", "prepare_inputs", "sample", "update", "detokenize")
MODEL_PHASES = ("forward", "lm_head")  # launched by the host; run on the device (on a CPU, by the host itself)


def analyze(trace_path: Path, limits: Limits | None, row_limit: int = 15) -> dict:
    trace = json.loads(Path(trace_path).read_text())
    info = json.loads(Path(f"{trace_path}.steps.json").read_text())
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    on_gpu = any(e.get("cat") == "kernel" for e in events)
    annotations = defaultdict(list)
    for e in events:
        if e.get("cat") == "user_annotation":
            annotations[e["name"]].append(e)
    steps_us = sum(e["dur"] for e in annotations["step"])
    num_steps = len(annotations["step"])
    report = {"trace": str(trace_path), "device": info["model"]["device"], "dtype": info["model"]["dtype"],
              "steps": num_steps, "step_ms_mean": steps_us / max(num_steps, 1) / 1e3,
              "step_split": _step_split(annotations, events, on_gpu, steps_us)}
    kernel_us = _kernel_device_us(events, annotations) if on_gpu else {
        name: sum(e["dur"] for e in ranges) for name, ranges in annotations.items() if name.startswith(KERNEL_PREFIX)}
    calls = {name: len(annotations[name]) for name in kernel_us}
    traffic = kernel_traffic(info)
    report["kernels"] = [_kernel_row(name.removeprefix(KERNEL_PREFIX), calls[name], us, steps_us,
                                     traffic.get(name.removeprefix(KERNEL_PREFIX)), limits)
                         for name, us in sorted(kernel_us.items(), key=lambda item: -item[1])]
    report["ops"] = _op_rows(events, on_gpu, steps_us)[:row_limit]
    if limits:
        report["limits"] = limits._asdict()
    return report


def kernel_traffic(info: dict) -> dict[str, Traffic]:
    """Bytes and FLOPs each kernel had to move and compute over the profiled steps, from their batches."""
    m = info["model"]
    heads, kv_heads, head_dim, elem = m["num_heads"], m["num_kv_heads"], m["head_dim"], m["elem"]
    total: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def add(name: str, traffic: Traffic, times: int) -> None:
        total[name][0] += traffic.bytes * times
        total[name][1] += traffic.flops * times

    layers = m["num_layers"]
    for step in info["steps"]:
        tokens = len(step["decode_seq_lens"]) + sum(q for _, q in step["prefills"])
        for seq_len in step["decode_seq_lens"]:
            add("paged_decode_attention", decode_traffic(1, seq_len, heads, kv_heads, head_dim, m["block_size"], elem),
                layers)
        for prefix, q_len in step["prefills"]:
            add("prefill_attention", prefill_traffic(prefix, q_len, heads, kv_heads, head_dim, m["block_size"], elem),
                layers)
        add("embedding", embedding_traffic(tokens, m["hidden"], elem), 1)
        add("rotary_embedding_and_write_kv", rotary_write_kv_traffic(tokens, heads, kv_heads, head_dim, elem), layers)
        add("rms_norm", rms_norm_traffic(tokens, m["hidden"], elem), 2 * layers + 1)
        add("silu_and_mul", silu_and_mul_traffic(tokens, m["intermediate"], elem), layers)
        hidden, inter = m["hidden"], m["intermediate"]
        for inputs, outputs in ((hidden, (heads + 2 * kv_heads) * head_dim), (heads * head_dim, hidden),
                                (hidden, 2 * inter), (inter, hidden)):  # qkv, o, gate-up, down
            add("linear", linear_traffic(tokens, inputs, outputs, elem), layers)
        # The lm_head on the rows that sample: every decode, and each prefill chunk counted as one (one that
        # does not end its prompt samples nothing; the weight's read, the bulk, is the same).
        add("linear", linear_traffic(len(step["decode_seq_lens"]) + len(step["prefills"]), hidden, m["vocab"], elem),
            1)
    return {name: Traffic(*values) for name, values in total.items()}


def _kernel_row(name: str, calls: int, us: float, steps_us: float, traffic: Traffic | None,
                limits: Limits | None) -> dict:
    row = {"name": name, "calls": calls, "total_ms": us / 1e3, "mean_us": us / max(calls, 1),
           "pct_of_steps": 100 * us / steps_us if steps_us else 0.0}
    if traffic and us:
        row |= {"gb_s": traffic.bytes / us / 1e3, "tflop_s": traffic.flops / us / 1e6}
        if limits:
            row |= {"frac_of_copy_bw": row["gb_s"] / limits.copy_bw_gbps,
                    "frac_of_matmul": row["tflop_s"] / limits.matmul_tflops}
            row["roofline_frac"] = max(row["frac_of_copy_bw"], row["frac_of_matmul"])
    return row


def _step_split(annotations: dict, events: list[dict], on_gpu: bool, steps_us: float) -> dict:
    """Each phase's share of the steps' wall time; on a GPU also the device's busy time (kernels and copies)."""
    split = {name: sum(e["dur"] for e in annotations[name]) for name in (*HOST_PHASES, *MODEL_PHASES)}
    host = sum(split[name] for name in HOST_PHASES)
    split["host_other"] = steps_us - host - sum(split[name] for name in MODEL_PHASES)
    shares = {f"{name}_pct": 100 * us / steps_us if steps_us else 0.0 for name, us in split.items()}
    shares["host_pct"] = 100 * (host + split["host_other"]) / steps_us if steps_us else 0.0
    if on_gpu:
        busy = sum(e["dur"] for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
        shares["device_busy_pct"] = 100 * busy / steps_us if steps_us else 0.0
    else:  # the model runs on the host: its time is the "device's"
        shares["device_busy_pct"] = shares["forward_pct"] + shares["lm_head_pct"]
    return shares


def _kernel_device_us(events: list[dict], annotations: dict) -> dict[str, float]:
    """GPU time of each kernel:<name> range: the device kernels whose launches (matched by correlation id) fall
    inside one of the range's host intervals on the same thread."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ranges = [(name, e) for name, es in annotations.items() if name.startswith(KERNEL_PREFIX) for e in es]
    totals = {name: 0.0 for name, _ in ranges}
    for kernel in (e for e in events if e.get("cat") == "kernel"):
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            continue
        for name, r in ranges:
            if r["tid"] == launch["tid"] and r["ts"] <= launch["ts"] <= r["ts"] + r["dur"]:
                totals[name] += kernel["dur"]
                break
    return totals


def _op_rows(events: list[dict], on_gpu: bool, steps_us: float) -> list[dict]:
    """Device kernels by name on a GPU; on a CPU, aten ops by self time (their time less their child ops')."""
    times: dict[str, list[float]] = defaultdict(list)
    if on_gpu:
        for e in events:
            if e.get("cat") == "kernel":
                times[e["name"]].append(e["dur"])
    else:
        for name, us in _self_times([e for e in events if e.get("cat") == "cpu_op"]):
            times[name].append(us)
    rows = [{"name": name, "calls": len(ts), "total_ms": sum(ts) / 1e3, "mean_us": sum(ts) / len(ts),
             "pct_of_steps": 100 * sum(ts) / steps_us if steps_us else 0.0} for name, ts in times.items()]
    return sorted(rows, key=lambda row: -row["total_ms"])


def _self_times(ops: list[dict]):
    """(name, self microseconds) of each op: nested ops on a thread are ranges inside their parent's."""
    by_thread = defaultdict(list)
    for e in ops:
        by_thread[(e["pid"], e["tid"])].append(e)
    for thread_ops in by_thread.values():
        thread_ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, child time]
        for e in thread_ops:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                done, child = stack.pop()
                yield done["name"], done["dur"] - child
            if stack:
                stack[-1][1] += e["dur"]
            stack.append([e, 0.0])
        for done, child in reversed(stack):
            yield done["name"], done["dur"] - child


def print_report(report: dict) -> None:
    split = report["step_split"]
    print(f"{report['steps']} steps, {report['step_ms_mean']:.2f} ms each on {report['device']} ({report['dtype']}); "
          f"trace: {report['trace']}")
    print("share of the steps: " + ", ".join(f"{k.removesuffix('_pct')} {v:.1f}%" for k, v in split.items()))
    limits = report.get("limits")
    if limits:
        print(f"limits measured: copy {limits['copy_bw_gbps']:.1f} GB/s, matmul {limits['matmul_tflops']:.2f} TFLOP/s")
    header = f"{'kernel':<28}{'calls':>7}{'total ms':>10}{'mean us':>10}{'% steps':>9}{'GB/s':>9}{'TFLOP/s':>9}{'roofline':>9}"
    print(header)
    for row in report["kernels"]:
        print(f"{row['name']:<28}{row['calls']:>7}{row['total_ms']:>10.2f}{row['mean_us']:>10.1f}"
              f"{row['pct_of_steps']:>9.1f}{row.get('gb_s', 0):>9.1f}{row.get('tflop_s', 0):>9.3f}"
              f"{row.get('roofline_frac', float('nan')):>9.2f}")
    print(f"{'op (self time)':<60}{'calls':>7}{'total ms':>10}{'mean us':>10}{'% steps':>9}")
    for row in report["ops"]:
        print(f"{row['name'][:59]:<60}{row['calls']:>7}{row['total_ms']:>10.2f}{row['mean_us']:>10.1f}"
              f"{row['pct_of_steps']:>9.1f}")
