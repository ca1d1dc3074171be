"""benchmarks/gpu_check.py keeps working without a GPU: its dry run takes every step at tiny sizes on the CPU
and reports figures for each, and a step that overruns its time limit is stopped and reported."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check_plan import CPU_DRY_RUN
from benchmarks.gpu_check_report import goal
from benchmarks.gpu_check_steps import STEPS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_dir = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-dry-run", "--output-dir", str(out_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = out_dir.glob("gpu-check-*.json")
    return json.loads(path.read_text()) | {"stdout": result.stdout}


def test_dry_run_takes_every_step_and_reports_figures_without_errors(dry_run: dict) -> None:
    assert dry_run["mode"] == "cpu-dry-run" and dry_run["failed_steps"] == []
    assert list(dry_run["steps"]) == list(STEPS)
    for name, step in dry_run["steps"].items():
        assert step["status"] == "ok" and "error" not in step, (name, step)
        assert step["figures"], name
    assert dry_run["steps"]["tests"]["figures"]["passed"] > 0
    assert dry_run["steps"]["kernels"]["figures"]["records"]
    sweep = CPU_DRY_RUN.kernel_sweep
    splits = dry_run["steps"]["kernels"]["figures"]["decode_split_choice"]
    assert len(splits) == len(sweep.split_batches) * len(sweep.split_contexts)
    assert all(str(case["eager_choice"]) in case["time_us"] for case in splits.values())
    gemv_cases = dry_run["steps"]["kernels"]["figures"]["gemv_vs_cublas"]
    assert len(gemv_cases) == 4 * len(sweep.gemv_rows)  # qkv, o, gate-up and down at each batch
    assert all(case["gemv_max_abs_diff"] < 1e-4 for case in gemv_cases.values())  # fp32 in the dry run
    assert dry_run["steps"]["decode_latency"]["figures"]["profiled"]["device_ops"]
    assert dry_run["steps"]["decode_latency"]["figures"]["ms_per_token_median_without_gemv"] > 0
    assert dry_run["steps"]["compile_stalls"]["figures"]["after_warm_up"], "no kernel launch counted"
    assert all(dry_run[key] for key in ("device", "date", "commit"))


def test_dry_run_judges_correctness_but_not_performance(dry_run: dict) -> None:
    verdicts = {g["goal"]: g["verdict"] for step in dry_run["steps"].values() for g in step["goals"]}
    assert verdicts["tests failing"] == verdicts["served requests failing"] == "met"
    assert verdicts["compilations after warm-up"] == "met"
    assert verdicts["throughput / transformers generate_batch"] == "not judged (CPU dry run)"
    assert "compilations after warm-up" in dry_run["stdout"]  # the summary table


def test_dry_run_draws_its_chart_or_says_why_not(dry_run: dict) -> None:
    if dry_run["png"]:
        assert Path(dry_run["png"]).stat().st_size > 0
    else:
        assert "matplotlib" in dry_run["png_note"]


def test_a_step_past_its_time_limit_is_stopped_and_reported(tmp_path: Path) -> None:
    plan = CPU_DRY_RUN._replace(step_time_limit_s={"kernels": 0.5})
    args = argparse.Namespace(cpu_dry_run=True, num_prompts=None, steps=["kernels"])
    step = gpu_check.run_step_process("kernels", 1, args, plan, tmp_path)
    assert step["status"] == "failed" and "time limit" in step["error"]


def test_a_missed_goal_says_by_how_much() -> None:
    assert goal("x", 0.6, 0.8)["verdict"] == "missed by 0.2 (25% short)"
    assert goal("x", 0.9, 0.8)["verdict"] == "met"
    assert goal("x", 3, 0, at_most=True)["verdict"] == "missed by 3"
