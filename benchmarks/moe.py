"""A mixture-of-experts decode step on the CPU: TokModel's FusedMoE layer (kernel_backend="torch", the reference
kernels/reference.py fused_moe) against transformers' MixtralSparseMoeBlock on the same random weights, at a tiny
Mixtral shape (8 experts, top-2, hidden 1024, intermediate 3584: Mixtral-8x7B's 3.5 ratio) for decode batches of
1 to 64 tokens. Prints one JSON object and writes it to benchmarks/results/moe-cpu-<dtype>-<date>.json.

    python benchmarks/moe.py --threads 1

transformers runs its experts as config._experts_implementation says: "grouped_mm" (what from_pretrained picks
on this version) and "eager" (its loop over the experts hit) are timed; "batched_mm", which gathers every
token's expert weights, took 3.4 s a call at batch 16 and is left out. Each call is one
block's forward on [batch, hidden]; the systems take turns call by call, so machine noise hits them alike.
Figures are medians in ms; "speedup" is a transformers median over TokModel's (above 1: TokModel is faster).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere in the checkout

from bench.common import default_result_path, machine_info, save_json  # noqa: E402
from engine.layers.moe import FusedMoE  # noqa: E402
from kernels import get_ops  # noqa: E402

SHAPE = {"num_local_experts": 8, "num_experts_per_tok": 2, "hidden_size": 1024, "intermediate_size": 3584}
HF_IMPLEMENTATIONS = ("grouped_mm", "eager")


def blocks(dtype: torch.dtype) -> tuple[FusedMoE, dict[str, torch.nn.Module]]:
    """TokModel's layer and transformers' block per experts implementation, all on the same random weights."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**SHAPE)
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    shapes = {"gate.weight": (e, h), "experts.gate_up_proj": (e, 2 * i, h), "experts.down_proj": (e, h, i)}
    weights = {name: torch.randn(shape).mul_(shape[-1] ** -0.5).to(dtype) for name, shape in shapes.items()}
    hf = {}
    for implementation in HF_IMPLEMENTATIONS:
        config = copy.copy(config)
        config._experts_implementation = implementation
        with torch.device("meta"):
            block = MixtralSparseMoeBlock(config)
        block.load_state_dict(weights, assign=True)  # the same tensors: only the experts' dispatch differs
        hf[implementation] = block.eval()
    layer = FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                     config.intermediate_size, renormalize=True, ops=get_ops("torch")).to(dtype)
    for name, tensor in weights.items():
        layer.load_weight(name, tensor)
    return layer.eval(), hf


def time_calls(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each, the calls taking turns; one untimed warm-up round."""
    times = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def bench_batch(layer: FusedMoE, hf: dict[str, torch.nn.Module], batch: int, dtype: torch.dtype,
                rounds: int) -> dict:
    hidden = torch.randn(batch, SHAPE["hidden_size"], dtype=dtype)
    expected = hf[HF_IMPLEMENTATIONS[0]](hidden[None])[0]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(layer(hidden), expected, atol=tolerance, rtol=tolerance)  # the same work
    calls = {"tokmodel": lambda: layer(hidden)}
    calls |= {f"hf-{name}": (lambda block=block: block(hidden[None])) for name, block in hf.items()}
    medians = {name: 1e3 * statistics.median(t) for name, t in time_calls(calls, rounds).items()}
    return {"batch": batch, "median_ms": {name: round(ms, 3) for name, ms in medians.items()},
            "speedup": {name: round(ms / medians["tokmodel"], 3) for name, ms in medians.items() if name != "tokmodel"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; on a shared machine use 1")
    parser.add_argument("--batches", default="1,4,16,64", help="decode batch sizes (tokens per step)")
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per system and batch")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/moe-cpu-<dtype>-<date>.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    layer, hf = blocks(dtype)
    with torch.inference_mode():
        results = [bench_batch(layer, hf, int(batch), dtype, args.rounds) for batch in args.batches.split(",")]
    report = {"shape": SHAPE, "dtype": args.dtype, "device": "cpu", "machine": machine_info("cpu"),
              "results": results}
    report["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)  # other jobs skew timings
    save_json(report, args.output or default_result_path("moe", "cpu", args.dtype))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
