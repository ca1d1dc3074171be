"""`tokmodel profile` in process, on a one-layer random model: the trace holds every step and every kernel call
the workload makes, the step's time splits into its phases, and profiling leaves the engine as it found it.
(The server's /start_profile and /stop_profile are tested in test_bench_serve.py, on its server.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.trace_report import _self_times
from engine import LLM, SamplingParams
from engine.profiler import EngineProfiler
from kernels import KernelOps, cpu_ops
from server.cli import main
from test_bench_offline import TINY


def test_profile_counts_every_step_and_kernel_call_of_the_workload(tmp_path: Path, capsys) -> None:
    report_path = tmp_path / "report.json"
    # The plain loop's steps (on CUDA async scheduling, the default there, adds one that only hands over tokens)
    assert main(["profile", *TINY, "--num-prompts", "2", "--input-len", "16", "--output-len", "3",
                 "--no-async-scheduling", "--trace-dir", str(tmp_path), "--output-json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    trace = json.loads(Path(report["trace"]).read_text())
    assert trace["traceEvents"]  # a Chrome/Perfetto trace
    # one step prefills both prompts (and samples their first tokens), two more decode them
    assert report["steps"] == 3
    calls = {row["name"]: row["calls"] for row in report["kernels"]}
    # one layer: 2 norms and the final one; the default CPU backend ("cpu", C kernels) attends once per decode
    # step, the torch path (without a C compiler) once per decode group (here each sequence)
    decode_groups = 1 if cpu_ops.available() else 2
    # the matmuls: qkv, o, gate-up and down a layer, and the lm_head, each step; one embedding lookup a step
    assert calls == {"prefill_attention": 1, "paged_decode_attention": 2 * decode_groups,
                     "rotary_embedding_and_write_kv": 3, "rms_norm": 3 * 3, "silu_and_mul": 3, "linear": 3 * 5,
                     "embedding": 3}
    split = report["step_split"]
    phases = ("schedule", "prepare_inputs", "sample", "update", "detokenize", "forward", "lm_head", "host_other")
    assert sum(split[f"{p}_pct"] for p in phases) == pytest.approx(100.0)
    assert all(0 < row["roofline_frac"] for row in report["kernels"])
    assert "rms_norm" in capsys.readouterr().out


def test_profiling_leaves_the_engine_as_it_found_it(tmp_path: Path) -> None:
    llm = LLM(model=TINY[1], load_format="dummy", dtype="float32")
    core = llm.engine
    layer_ops = [m.ops for m in core.runner.model.modules() if isinstance(getattr(m, "ops", None), KernelOps)]
    before = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    profiler = EngineProfiler(core, tmp_path)
    profiler.start()
    during = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    profiler.stop()
    assert during[0].outputs[0].token_ids == before[0].outputs[0].token_ids
    assert "step" not in vars(core) and "forward" not in vars(core.runner.model)
    assert [m.ops for m in core.runner.model.modules() if isinstance(getattr(m, "ops", None), KernelOps)] == layer_ops
    with pytest.raises(RuntimeError, match="not running"):
        profiler.stop()


def test_op_self_time_excludes_the_ops_nested_inside() -> None:
    op = lambda name, ts, dur: {"name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}  # noqa: E731
    events = [op("outer", 0, 100), op("inner", 10, 30), op("leaf", 15, 5), op("next", 50, 10), op("after", 200, 7)]
    assert sorted(_self_times(events)) == [("after", 7), ("inner", 25), ("leaf", 5), ("next", 10), ("outer", 60)]
