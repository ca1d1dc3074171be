"""Helpers shared by the benchmarks and `tokmodel bench`: where a run happened, and how its figures are saved."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"  # in a checkout


def machine_info(device: str) -> dict:
    """What a reader needs to compare two result files: processor, accelerator, library versions, date, command."""
    import torch
    import transformers

    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]), "git_commit": _git_commit()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _git_commit() -> str:
    """HEAD of the checkout, with "+dirty" when tracked files differ from it."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=repo).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def default_result_path(benchmark: str, device: str, tag: str = "") -> Path:
    """benchmarks/results/<benchmark>-<device>[-<tag>]-<date>.json"""
    device_kind = device.split(":")[0]
    date = datetime.date.today().isoformat()
    return RESULTS_DIR / f"{benchmark}-{device_kind}{'-' + tag if tag else ''}-{date}.json"


def save_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def save_bar_chart(values: dict[str, float], path: Path, title: str, ylabel: str) -> bool:
    """A bar per system, its value written on top. Returns False (and says so) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(values), 4.2))
    bars = ax.bar(list(values), list(values.values()), color=["#d95f02"] + ["#7570b3"] * (len(values) - 1))
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
