"""What sampling costs per step, as issue 11 measured it: 256 sequences decoding together on a dummy Llama of one
layer, 64 wide, with SmolLM2's 49,152-token vocabulary (bench/configs/smollm2-vocab-1-layer.json), so that
the model costs almost nothing and the sampler shows. Prints one JSON object.

    python benchmarks/sampling.py --threads 1                  # the README's figures
    python benchmarks/sampling.py --threads 1 --baseline main  # also the Sampler of another revision (git show)

Two measurements, each setting beside greedy in the same run, the settings taking turns call by call:
  sampler  Sampler()(logits, requests) alone on the model's logits for 256 rows, per call
  step     EngineCore.step() of a decode step of 256 requests (model, sampler, scheduling, output), an engine
           per setting
Settings: greedy; "realistic", what clients send (temperature 0.8, top_p 0.95, top_k 50, repetition_penalty 1.1,
a seed per request); and each of those alone (temperature 0.8 alone, the others at temperature 1.0, the server's
default), plus min_p 0.05. Figures are medians in ms; "ratio" divides each by greedy's; "spread" is the
interquartile range over the median, a measure of the machine's noise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere in the checkout

from bench.common import machine_info  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.engine_core import EngineCore  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampler import Sampler  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

CONFIG = REPO / "bench" / "configs" / "smollm2-vocab-1-layer.json"
NUM_SEQS = 256
PROMPT_LEN = 8
REALISTIC = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1, "seed": 0}
SETTINGS = {"greedy": {"temperature": 0.0}, "realistic": REALISTIC, "temperature": {"temperature": 0.8},
            "top_p": {"top_p": 0.95}, "top_k": {"top_k": 50}, "min_p": {"min_p": 0.05},
            "repetition_penalty": {"repetition_penalty": 1.1}, "seed": {"seed": 0}}


def request_params(setting: str, index: int, max_tokens: int) -> SamplingParams:
    """The setting's params for request `index`; a seed, when the setting has one, is the request's own."""
    fields = dict(SETTINGS[setting])
    if "seed" in fields:
        fields["seed"] = index
    return SamplingParams(**fields, max_tokens=max_tokens, ignore_eos=True)


def prompts(vocab: int) -> list[list[int]]:
    return np.random.default_rng(0).integers(0, vocab, (NUM_SEQS, PROMPT_LEN)).tolist()


Case = tuple[str, type, str]  # (which sampler, its class, which setting)


def time_sampler(logits: torch.Tensor, cases: list[Case], rounds: int) -> dict[tuple[str, str], list[float]]:
    """The samplers alone on `logits`, a call per case in turn, `rounds` times."""
    requests = {(name, setting): [sample_request(setting, i, prompt) for i, prompt in enumerate(prompts(logits.shape[1]))]
                for name, _, setting in cases}
    samplers = {name: sampler_class() for name, sampler_class, _ in cases}
    times = {(name, setting): [] for name, _, setting in cases}
    for _ in range(rounds):
        for name, _, setting in cases:
            batch = logits.clone()
            start = time.perf_counter()
            samplers[name](batch, requests[name, setting])
            times[name, setting].append(time.perf_counter() - start)
    return times


def sample_request(setting: str, index: int, prompt: list[int]) -> Request:
    """A request 16 tokens into its output, as a decoding one is (its penalties have something to count)."""
    request = Request(f"{setting}-{index}", f"{setting}-{index}", 0, prompt, request_params(setting, index, 64), 64)
    for token in range(16):
        request.append_token((index * 31 + token * 7) % 49152)
    return request


def decode_logits(core: EngineCore) -> torch.Tensor:
    """The logits the model gives the sampler in the second step of NUM_SEQS greedy requests."""
    captured = []
    sampler = core.sampler
    core.sampler = lambda logits, requests: captured.append(logits.clone()) or sampler(logits, requests)
    for i, prompt in enumerate(prompts(core.vocab_size)):
        core.add_request(f"capture-{i}", prompt, request_params("greedy", i, 2))
    while core.has_unfinished_requests():
        core.step()
    core.sampler = sampler
    return captured[-1]


def time_steps(args: argparse.Namespace, cases: list[Case]) -> dict[tuple[str, str], list[float]]:
    """Whole engine steps: an engine per case with NUM_SEQS requests decoding, prefilled and decoded once, then
    stepped in turn `args.steps` times (so that a burst of load on a shared machine falls on every case alike)."""
    cores = {(name, setting): new_engine(args, sampler_class) for name, sampler_class, setting in cases}
    for (name, setting), core in cores.items():
        for i, prompt in enumerate(prompts(core.vocab_size)):
            core.add_request(f"{setting}-{i}", prompt, request_params(setting, i, args.steps + 2))
        core.step()  # the prefill
        core.step()
    times = {case: [] for case in cores}
    for _ in range(args.steps):
        for case, core in cores.items():
            start = time.perf_counter()
            core.step()
            times[case].append(time.perf_counter() - start)
    assert not any(core.has_unfinished_requests() for core in cores.values())
    return times


def new_engine(args: argparse.Namespace, sampler_class: type) -> EngineCore:
    core = EngineCore(EngineConfig(model=str(CONFIG), load_format="dummy", device=args.device, dtype=args.dtype,
                                   max_num_seqs=NUM_SEQS, max_num_batched_tokens=NUM_SEQS * PROMPT_LEN))
    core.sampler = sampler_class()
    return core


def summary(times: dict[tuple[str, str], list[float]], name: str) -> dict:
    """One sampler's figures: median ms per setting, its ratio to greedy's, and the spread (interquartile range
    over the median)."""
    times = {setting: t for (which, setting), t in times.items() if which == name}
    medians = {s: statistics.median(t) * 1e3 for s, t in times.items()}
    spread = {s: (np.percentile(t, 75) - np.percentile(t, 25)) * 1e3 / medians[s] for s, t in times.items()}
    return {"median_ms": _rounded(medians), "ratio": _rounded({s: m / medians["greedy"] for s, m in medians.items()}),
            "spread": _rounded(spread), "samples": {s: len(t) for s, t in times.items()}}


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in values.items()}


def baseline_sampler(revision: str) -> type:
    """The Sampler class of engine/sampler.py at `revision`, loaded from git (it must import only modules this
    checkout still has)."""
    source = subprocess.run(["git", "show", f"{revision}:engine/sampler.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType(f"sampler_at_{revision}")
    exec(compile(source, f"{revision}:engine/sampler.py", "exec"), module.__dict__)
    return module.Sampler


def speedup(new: dict, old: dict) -> dict:
    return {kind: _rounded({s: old[kind]["median_ms"][s] / new[kind]["median_ms"][s] for s in old[kind]["median_ms"]})
            for kind in ("sampler", "step")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--dtype", help="default: the engine's (bfloat16 on cuda or a fast-bf16 CPU, else float32)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; on a shared machine use 1 (a parallel op "
                                                    "waits for any descheduled thread)")
    parser.add_argument("--rounds", type=int, default=15, help="sampler calls per setting")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per setting")
    parser.add_argument("--baseline", metavar="REVISION", help="also time engine/sampler.py of this git revision")
    parser.add_argument("--baseline-settings", default="greedy,realistic,temperature,top_p",
                        help="settings timed for the baseline (its top_k alone took seconds per call)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    core = new_engine(args, Sampler)
    cases = [("this checkout", Sampler, setting) for setting in SETTINGS]
    if args.baseline:
        old = baseline_sampler(args.baseline)
        cases += [(f"baseline {args.baseline}", old, setting) for setting in args.baseline_settings.split(",")]
    times = {"sampler": time_sampler(decode_logits(core), cases, args.rounds), "step": time_steps(args, cases)}
    names = list(dict.fromkeys(name for name, _, _ in cases))
    report = {"model": str(CONFIG.relative_to(REPO)), "num_seqs": NUM_SEQS, "device": str(core.runner.device),
              "dtype": str(core.runner.dtype).removeprefix("torch."), "settings": SETTINGS,
              "machine": machine_info(str(core.runner.device)),
              "results": {name: {kind: summary(t, name) for kind, t in times.items()} for name in names}}
    if args.baseline:
        report["speedup_over_baseline"] = speedup(*(report["results"][name] for name in names))
    report["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)  # other jobs skew timings
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
