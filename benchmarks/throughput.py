"""`tokmodel bench throughput` (bench/throughput.py) as a script of the checkout, for the campaigns and
benchmarks/gpu_check_steps.py, which call main, parse_args and make_workload.

    python benchmarks/throughput.py --compare transformers --threads 1 --output
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from bench.throughput import main, make_workload, parse_args  # noqa: E402, F401

if __name__ == "__main__":
    main()
