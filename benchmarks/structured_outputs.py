"""What a grammar costs a decode step: 64 sequences decoding under a nested JSON schema against the same 64
unconstrained, on the same engine, alternating rounds, realistic sampling (temperature 0.8, top_p 0.95).

    python -m benchmarks.structured_outputs [--num-seqs 64] [--steps 12] [--rounds 3] [--output]

A round adds the batch, runs its prefill, then times `--steps` decode steps (every sequence decodes in each;
the schema is long enough that none completes). Prints JSON: median step time of each mode and their ratio
(goal: constrained at most 1.2x unconstrained).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

from bench.common import default_result_path, machine_info, save_json
from engine import EngineConfig, SamplingParams
from engine.engine_core import EngineCore
from engine.structured_output import StructuredOutputsParams

# Nested, with bounded strings and arrays, as an extraction schema would be.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer"},
    "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                                 "city": {"type": "string", "maxLength": 30},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city", "zip"]},
    "skills": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "level": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["name", "level"]}, "maxItems": 5}},
    "required": ["name", "age", "address", "skills"]}
PROMPT = [{"role": "user", "content": "Invent a person and describe them as JSON: name, age, address, skills."}]


def time_decode_steps(core: EngineCore, constrained: bool, num_seqs: int, steps: int, ids: itertools.count) -> list[float]:
    constraint = StructuredOutputsParams(json=SCHEMA) if constrained else None
    prompt = {"prompt_token_ids": core.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=False)}
    for i in range(num_seqs):
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=steps + 1, ignore_eos=True,
                                structured_outputs=constraint)
        core.add_request(f"{next(ids)}", prompt, params)
    core.step()  # the prefill (the prompt is shared: one prefill, the rest prefix-cache hits)
    while core.scheduler.waiting or any(r.num_output_tokens == 0 for r in core.scheduler.running):
        core.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    while core.has_unfinished_requests():
        core.step()
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each mode")
    parser.add_argument("--dtype", help="default: the engine's")
    parser.add_argument("--output", nargs="?", const="auto", help="save the JSON (default path under results/)")
    args = parser.parse_args(argv)
    core = EngineCore(EngineConfig(dtype=args.dtype, max_num_seqs=max(args.num_seqs, 1)))
    ids = itertools.count()
    times: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    for round_index in range(args.rounds):
        for mode in times:
            times[mode] += time_decode_steps(core, mode == "json_schema", args.num_seqs, args.steps, ids)
            print(f"round {round_index + 1}/{args.rounds} {mode}: median step "
                  f"{statistics.median(times[mode]) * 1000:.1f} ms so far", file=sys.stderr)
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    report = {"benchmark": "structured_outputs", "num_seqs": args.num_seqs, "dtype": core.config.dtype,
              "steps_per_round": args.steps, "rounds": args.rounds,
              "median_step_ms": {mode: round(value * 1000, 2) for mode, value in medians.items()},
              "constrained_over_unconstrained": round(medians["json_schema"] / medians["unconstrained"], 3),
              "goal": "at most 1.2", "machine": machine_info(str(core.runner.device))}
    print(json.dumps(report, indent=2))
    if args.output:
        save_json(report, default_result_path("structured-outputs", str(core.runner.device))
                  if args.output == "auto" else args.output)
    return report


if __name__ == "__main__":
    main()
