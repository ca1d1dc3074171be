"""Host time per engine step: schedule + prepare + sample + update + emit, with the model's cost removed.

A tiny random-weight Llama (one layer, hidden 64) keeps the forward near free; the forward and the lm_head are
timed apart and subtracted, so what remains is the engine's own work between kernel launches. All requests
decode together (prefill steps are not timed). Prints one JSON object.

    python -m benchmarks.step_overhead --num-seqs 256 [--output-kind delta] [--output]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from bench.common import default_result_path, machine_info, save_json
from benchmarks.random_model import save_stand_in_tokenizer
from engine import EngineConfig, RequestOutputKind, SamplingParams
from engine.engine_core import EngineCore


def tiny_model_dir(out_dir: Path, vocab_size: int) -> Path:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=4096,
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(out_dir)
    save_stand_in_tokenizer(out_dir, vocab_size)
    return out_dir


def timed(owner: object, name: str, spent: list[float]) -> None:
    """Wrap owner.name so that each call adds its seconds to `spent`."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)
    setattr(owner, name, wrapper)


def measure(args: argparse.Namespace, model_dir: Path) -> dict:
    engine = EngineCore(EngineConfig(model=str(model_dir), load_format="dummy", device="cpu", dtype="float32",
                                     max_num_seqs=args.num_seqs, max_num_batched_tokens=max(2048, args.num_seqs)))
    params = SamplingParams(temperature=0, max_tokens=args.warm_steps + args.steps + 8, ignore_eos=True,
                            stop=["@@@"] if args.stop_strings else [],
                            output_kind=RequestOutputKind[args.output_kind.upper()])
    for i in range(args.num_seqs):
        engine.add_request(str(i), [(i * 7 + t) % 90 for t in range(args.prompt_len)], params)
    for _ in range(args.warm_steps):  # the prompts' prefills, then a few decodes
        engine.step()
    model = engine.runner.model
    model_s: list[float] = []
    timed(model, "forward", model_s)
    timed(model, "compute_logits", model_s)
    step_ms, host_ms = [], []
    for _ in range(args.steps):
        first_model_call = len(model_s)
        start = time.perf_counter()
        engine.step()
        step = time.perf_counter() - start
        step_ms.append(step * 1e3)
        host_ms.append((step - sum(model_s[first_model_call:])) * 1e3)
    return {"num_seqs": args.num_seqs, "steps": args.steps, "vocab_size": args.vocab_size,
            "stop_strings": args.stop_strings, "output_kind": args.output_kind, "torch_threads": args.threads,
            "step_ms_median": round(statistics.median(step_ms), 3), "host_ms_median": round(statistics.median(host_ms), 3),
            "host_ms_min": round(min(host_ms), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--warm-steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--stop-strings", action="store_true", help="every request has a stop string (detokenizes)")
    parser.add_argument("--output-kind", choices=["final_only", "delta", "cumulative"], default="final_only",
                        help="final_only: as LLM.generate; delta: as the server streams")
    parser.add_argument("--output", action="store_true", help="also write benchmarks/results/step-overhead-cpu-*.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one keeps a shared machine's noise low)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, tiny_model_dir(Path(tmp), args.vocab_size))
    result |= {"machine": machine_info("cpu")}
    print(json.dumps(result, indent=1))
    if args.output:
        save_json(result, default_result_path("step-overhead", "cpu", args.output_kind.replace("_", "-")))


if __name__ == "__main__":
    main()
