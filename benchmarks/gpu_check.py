"""One command for a GPU (issue 9): TokModel's CUDA tests, kernel figures, end-to-end runs and a count of kernel
compilations after warm-up, each figure judged against the issue's goal for an H100.

    python benchmarks/gpu_check.py                  # on a CUDA machine: H100 sizes, at most 10 minutes
    python benchmarks/gpu_check.py --cpu-dry-run    # every step at tiny sizes on the CPU, so CI keeps it working

It needs only torch, triton, transformers, safetensors, aiohttp, numpy and pytest, and no network: the models are
random weights of the shapes in bench/configs/ (a Hugging Face directory built in a temporary directory,
or load_format="dummy"). The steps, each in its own process and stopped at its time limit (benchmarks/
gpu_check_plan.py has the sizes and limits):

  tests           pytest: the kernels in bf16 and fp16 at the GPU shapes against their references, every model
                  family against transformers, the Triton backend against the torch one (per test in the JSON)
  kernels         decode attention at batch 1, 64, 256 and context 1k, 4k, 8k as a fraction of the copy
                  bandwidth measured in the same run; prefill at 4k against SDPA flash; the fused ops
  throughput      nano-vllm's workload (256 requests, prompts and outputs of 100-1024 tokens, ignore_eos) on the
                  Qwen3-0.6B shape, TokModel against transformers' generate_batch on the same weights
  decode_latency  batch-1 decode time per token on the Llama-3.1-8B shape against its weight-streaming floor
  serving         a short streaming-chat load through `tokmodel serve`
  compile_stalls  after warm-up, batches of varied sizes and lengths compile no Triton kernel (counted)
  idle_time       decode steps at batch 256 (Qwen3-0.6B shape, graphs on) under torch.profiler: the device's
                  busy share of each step (issue 12: idle under 10%)

Writes one JSON (device, date, commit, each step's figures, goals and verdicts: met, or missed by how much) and a
PNG to benchmarks/results/gpu-check-<gpu>-<date>.*; the dry run writes them to --output-dir (default: a new
temporary directory), never to benchmarks/results/. Prints a summary table last. Exits 1 when a step failed (an
error, a failing test, a timeout); a missed goal is a result, not a failure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from bench.common import RESULTS_DIR, machine_info, save_json  # noqa: E402
from benchmarks.gpu_check_plan import CPU_DRY_RUN, H100, Plan  # noqa: E402
from benchmarks.gpu_check_report import draw, summary_table, withhold_hardware_verdicts  # noqa: E402
from benchmarks.gpu_check_steps import REPO, STARTED, STARTED_ENV, STEPS, log  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    parser.add_argument("--output-dir", help="where the JSON and PNG go (default: benchmarks/results, or a new "
                                             "temporary directory for --cpu-dry-run)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--num-prompts", type=int, help="requests of the throughput run (default: the plan's, 256 "
                                                        "on a GPU); the JSON records the number used")
    # Internal: how the orchestrator runs one step in a child process.
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--step-output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := set(args.steps) - set(STEPS):
        parser.error(f"--steps: unknown {sorted(unknown)}")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    plan = CPU_DRY_RUN if args.cpu_dry_run else H100
    if args.num_prompts:
        plan = plan._replace(throughput=plan.throughput._replace(num_prompts=args.num_prompts))
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_of(args)
    if args.step:
        return run_step_here(args.step, plan, Path(args.work_dir), Path(args.step_output))
    import torch

    if not plan.is_dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_check.py needs a CUDA GPU; --cpu-dry-run runs every step at tiny sizes on the CPU")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work_dir:
        steps = {name: run_step_process(name, number, args, plan, Path(work_dir))
                 for number, name in enumerate(args.steps, 1)}
    report = new_report(plan, steps, time.monotonic() - STARTED)
    path = result_path(args, plan, report["device"])
    report["png_note"] = draw(report, path.with_suffix(".png"))
    report["png"] = None if report["png_note"] else str(path.with_suffix(".png"))
    save_json(report, path)
    print(summary_table(report))
    print(f"\nwrote {path}" + (f" and {report['png']}" if report["png"] else f" ({report['png_note']})"))
    return 1 if report["failed_steps"] else 0


def run_step_process(name: str, number: int, args: argparse.Namespace, plan: Plan, work_dir: Path) -> dict:
    """One step in a child process (its own session, so that a timeout stops what it started too)."""
    limit = plan.step_time_limit_s[name]
    output = work_dir / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--work-dir", str(work_dir),
               "--step-output", str(output)]
    command += ["--cpu-dry-run"] * args.cpu_dry_run + (["--num-prompts", str(args.num_prompts)] if args.num_prompts else [])
    # The dry run hides any GPU, and runs the kernels in Triton's interpreter (read as they are imported).
    env = os.environ | {STARTED_ENV: str(STARTED)}
    env |= {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"} if plan.is_dry_run else {}
    log(f"step {number}/{len(args.steps)}: {name} (time limit {limit} s)")
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sys.stderr, start_new_session=True)
    try:
        process.wait(timeout=limit)
        step = json.loads(output.read_text()) if output.exists() else {
            "error": f"its process exited with {process.returncode} before writing a result"}
    except subprocess.TimeoutExpired:
        step = {"error": f"stopped at its time limit of {limit} s"}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    step = {"status": "failed" if "error" in step else "ok", "seconds": round(time.monotonic() - start, 1)} | step
    if plan.is_dry_run:
        withhold_hardware_verdicts(step)
    log(f"step {name}: {step['status']} in {step['seconds']:.0f} s" + (f": {step['error']}" if "error" in step else ""))
    return step


def run_step_here(name: str, plan: Plan, work_dir: Path, output: Path) -> int:
    """The child's side: run the step, and write its result (or its error) for the orchestrator."""
    import torch

    try:
        result = STEPS[name](plan, work_dir)
    except Exception as error:  # reported in the JSON; the orchestrator goes on to the next step
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    output.write_text(json.dumps(result, default=_plain))
    return 0


def _plain(value: object) -> object:
    """numpy scalars as Python numbers; anything else JSON lacks as its text."""
    return value.item() if hasattr(value, "item") else str(value)


def new_report(plan: Plan, steps: dict[str, dict], seconds: float) -> dict:
    machine = machine_info(plan.device)
    device = machine.get("gpu") or next((s["device"] for s in steps.values() if s.get("device")), None) \
        or f"CPU: {machine['cpu']}"
    for step in steps.values():
        step.pop("device", None)
    return {"check": "TokModel GPU check (issue 9)", "mode": plan.name, "device": device,
            "date": datetime.date.today().isoformat(), "commit": machine["git_commit"], "seconds": round(seconds, 1),
            "failed_steps": [name for name, s in steps.items() if s["status"] != "ok"],
            "goals_missed": [g["goal"] for s in steps.values() for g in s.get("goals", [])
                             if g["verdict"].startswith("missed")],
            "machine": machine, "plan": json.loads(json.dumps(plan._asdict(), default=str)), "steps": steps}


def result_path(args: argparse.Namespace, plan: Plan, device: str) -> Path:
    if args.output_dir:
        directory = Path(args.output_dir)
    else:
        directory = Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-")) if plan.is_dry_run else RESULTS_DIR
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return directory / f"gpu-check-{slug}-{datetime.date.today().isoformat()}.json"


if __name__ == "__main__":
    sys.exit(main())
