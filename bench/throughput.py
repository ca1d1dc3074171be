"""`tokmodel bench throughput`: offline throughput, as `vllm bench throughput`: N random prompts through
`LLM.generate` in this process, and with --compare transformers the same workload through transformers on the same
weights and dtype, in the same run, reported side by side as ratios. Prints one JSON object.

    tokmodel bench throughput                                         # the default model, 32 requests
    tokmodel bench throughput --preset nano-vllm --shape qwen3-0.6b  # nano-vllm's workload, random weights
    tokmodel bench throughput --compare transformers --output         # + transformers; JSON and chart

Workload: prompts of random token ids (fixed seed), lengths uniform in [--input-len-min, --input-len-max] (or
vLLM's --input-len with --random-range-ratio), each request asking for exactly its own output length, greedy, EOS
ignored. Every system is warmed up on a tiny request first; the timed run is one call over all requests.

Systems (--peers; --compare transformers is tokmodel,hf-generate,hf-generate-batch):
  tokmodel           TokModel's LLM.generate, all requests at once (continuous batching).
  hf-generate        transformers' padded `model.generate`, --hf-batch-size requests per batch in workload order,
                     left padded; a batch runs to its longest output (min_new_tokens = max_new_tokens).
  hf-generate-batch  transformers' continuous batching `model.generate_batch`; its API takes one max_new_tokens,
                     so every request runs to the longest output of the workload.
                     Each call builds its manager (static tensors, paged cache): ~13 s here, timed, as users pay it.
  hf-cb              the continuous batching manager behind generate_batch, built and started once before timing
                     (as tokmodel's engine is), fed per-request max_new_tokens: the same work as tokmodel.
The managers' own warm-up (CUDA graph capture; on the CPU only dummy batches) runs on CUDA only.
Output tokens/s counts USEFUL tokens only: each request counts its own output length, whatever a padded or
fixed-length peer computed beyond it. Total tokens/s adds the prompt tokens.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

from bench.common import default_result_path, machine_info, save_bar_chart, save_json
from bench.datasets import length_range
from bench.offline import add_offline_args, build_llm, offline_config

if TYPE_CHECKING:
    from engine.config import EngineConfig

DEFAULTS = {"num_prompts": 32, "input_len_min": 16, "input_len_max": 256, "output_len_min": 16, "output_len_max": 128}
# nano-vllm's bench.py: 256 sequences, prompt and output lengths uniform in [100, 1024], ignore_eos
PRESETS = {"nano-vllm": {"num_prompts": 256, "input_len_min": 100, "input_len_max": 1024,
                         "output_len_min": 100, "output_len_max": 1024}}
PEERS = ("tokmodel", "hf-generate", "hf-generate-batch", "hf-cb")


class Workload(NamedTuple):
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    rng = np.random.default_rng(args.seed or 0)  # the engine's --seed, as vLLM's
    n = args.num_prompts
    input_lens = rng.integers(args.input_len_min, args.input_len_max + 1, n)
    output_lens = rng.integers(args.output_len_min, args.output_len_max + 1, n)
    prompts = [rng.integers(0, vocab_size, int(length)).tolist() for length in input_lens]
    return Workload(prompts, [int(o) for o in output_lens])


def tiny_workload(vocab_size: int) -> Workload:
    return Workload([list(range(1, 9)), list(range(11, 23))], [4, 2])


def log(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


# ---- systems: each builds itself, warms up, then returns a function that runs a workload and checks it ----

def setup_tokmodel(args: argparse.Namespace, config: EngineConfig) -> Callable[[Workload], None]:
    from engine import SamplingParams

    llm = build_llm(config)

    def run(workload: Workload) -> None:
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in workload.output_lens]
        outputs = llm.generate([{"prompt_token_ids": p} for p in workload.prompts], params, use_tqdm=False)
        _check_lengths([len(o.outputs[0].token_ids) for o in outputs], workload.output_lens, "tokmodel")

    return run


def load_hf_model(args: argparse.Namespace, config: EngineConfig):
    """transformers' own model on the weights TokModel loads (random weights of the same shapes for dummy)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.loader import resolve_model

    model_dir = resolve_model(config.model, config.load_format)
    if config.load_format == "dummy":
        with torch.device(config.device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=config.torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=config.torch_dtype).to(config.device)
    return model.eval()


def setup_hf_generate(args: argparse.Namespace, config: EngineConfig) -> Callable[[Workload], None]:
    import torch
    from transformers import GenerationConfig

    model = load_hf_model(args, config)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.inference_mode()
    def run(workload: Workload) -> None:
        lengths, expected = [], []
        for start in range(0, len(workload.prompts), args.hf_batch_size):
            prompts = workload.prompts[start:start + args.hf_batch_size]
            max_new = max(workload.output_lens[start:start + args.hf_batch_size])
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, prompt in enumerate(prompts):  # left padding
                input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            generation = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                                          pad_token_id=pad_id, eos_token_id=model.config.eos_token_id)
            out = model.generate(input_ids=input_ids.to(config.device), attention_mask=mask.to(config.device),
                                 generation_config=generation)
            lengths += [out.shape[1] - width] * len(prompts)
            expected += [max_new] * len(prompts)
        _check_lengths(lengths, expected, "hf-generate")

    return run


def setup_hf_generate_batch(args: argparse.Namespace, config: EngineConfig) -> Callable[[Workload], None]:
    from transformers import GenerationConfig

    model = load_hf_model(args, config)
    cb_warmup = _cb_warmup(config)

    def run(workload: Workload) -> None:
        max_new = max(workload.output_lens)  # one max_new_tokens for the whole batch in this API
        generation = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=-1)  # -1: no EOS
        results = model.generate_batch(inputs=workload.prompts, generation_config=generation, progress_bar=False,
                                       warmup=cb_warmup)
        _check_lengths([len(r.generated_tokens) for r in results.values()], [max_new] * len(workload.prompts),
                       "hf-generate-batch")

    return run


def setup_hf_cb(args: argparse.Namespace, config: EngineConfig) -> Callable[[Workload], None]:
    """generate_batch's manager, started once (as a server would) and fed per-request max_new_tokens."""
    from transformers import GenerationConfig

    model = load_hf_model(args, config)
    generation = GenerationConfig(do_sample=False, max_new_tokens=args.output_len_max, eos_token_id=-1)  # -1: no EOS
    manager = model.init_continuous_batching(generation_config=generation)
    if _cb_warmup(config):
        manager.warmup()
    manager.start()

    def run(workload: Workload) -> None:
        ids = [manager.add_request(p, max_new_tokens=o, eos_token_id=-1)
               for p, o in zip(workload.prompts, workload.output_lens)]
        results = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped early")
        _check_lengths([len(results[i].generated_tokens) for i in ids], workload.output_lens, "hf-cb")

    run.close = lambda: manager.stop(block=True, timeout=30)
    return run


def _cb_warmup(config: EngineConfig) -> bool:
    """transformers' batching manager warms up on every call by default: it pre-captures CUDA graphs, and on the
    CPU (no graphs) it only runs dummy batches at the largest sizes, about 15 s per call on a 2-core CPU. That is
    start-up, not throughput, so it is skipped there; our own untimed warm-up request has run already."""
    return config.device.startswith("cuda")


SETUPS = {"tokmodel": setup_tokmodel, "hf-generate": setup_hf_generate,
          "hf-generate-batch": setup_hf_generate_batch, "hf-cb": setup_hf_cb}


def _check_lengths(got: list[int], expected: list[int], system: str) -> None:
    if got != expected:
        bad = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
        raise RuntimeError(f"{system}: request {bad} produced {got[bad]} tokens, expected {expected[bad]}")


def measure(name: str, args: argparse.Namespace, config: EngineConfig, workload: Workload, vocab_size: int) -> dict:
    log(f"{name}: loading")
    start = time.perf_counter()
    run = SETUPS[name](args, config)
    load_s = time.perf_counter() - start
    log(f"{name}: warm-up")
    run(tiny_workload(vocab_size))
    log(f"{name}: timing {len(workload.prompts)} requests")
    start = time.perf_counter()
    run(workload)
    elapsed = time.perf_counter() - start
    n = len(workload.prompts)
    result = {"elapsed_s": round(elapsed, 3), "requests_per_s": round(n / elapsed, 3),
              "output_tokens_per_s": round(workload.num_output_tokens / elapsed, 2),
              "total_tokens_per_s": round((workload.num_output_tokens + workload.num_prompt_tokens) / elapsed, 2),
              "load_s": round(load_s, 2)}
    log(f"{name}: {result['output_tokens_per_s']} output tok/s, {result['requests_per_s']} req/s in {elapsed:.1f} s")
    getattr(run, "close", lambda: None)()
    del run
    gc.collect()
    if config.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return result


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    add_offline_args(parser)
    parser.add_argument("--preset", choices=list(PRESETS), help="nano-vllm: its benchmark's workload (256 "
                        "requests, prompts and outputs of 100-1024 tokens); flags given after it still apply")
    workload = parser.add_argument_group("workload")
    workload.add_argument("--num-prompts", type=int, help=f"(default: {DEFAULTS['num_prompts']})")
    workload.add_argument("--input-len", type=int, help="vLLM's: prompt length, with --random-range-ratio")
    workload.add_argument("--output-len", type=int, help="vLLM's: output length, with --random-range-ratio")
    workload.add_argument("--random-range-ratio", type=float, default=0.0,
                          help="--input-len and --output-len vary uniformly in [L * (1 - r), L * (1 + r)]")
    workload.add_argument("--input-len-min", type=int, help=f"(default: {DEFAULTS['input_len_min']})")
    workload.add_argument("--input-len-max", type=int, help=f"(default: {DEFAULTS['input_len_max']})")
    workload.add_argument("--output-len-min", type=int, help=f"(default: {DEFAULTS['output_len_min']})")
    workload.add_argument("--output-len-max", type=int, help=f"(default: {DEFAULTS['output_len_max']})")
    peers = parser.add_argument_group("peers")
    peers.add_argument("--compare", choices=["transformers"], help="also run transformers' padded generate and "
                       "generate_batch on the same workload, weights and dtype; report the ratios")
    peers.add_argument("--peers", default="tokmodel",
                       help=f"comma-separated systems to run, from {','.join(PEERS)} (default: tokmodel)")
    peers.add_argument("--hf-batch-size", type=int, default=32, help="requests per padded hf-generate batch")
    parser.add_argument("--output", nargs="?", const="auto",
                        help="write the JSON here (alone: benchmarks/results/throughput-<device>-<dtype>-<date>.json) "
                             "and a bar chart of output tok/s next to it (.png)")


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """args with the preset, shape and vLLM-style lengths applied; ValueError naming the flag for a bad one."""
    for name, value in (DEFAULTS | PRESETS.get(args.preset, {})).items():
        if getattr(args, name) is None:  # a flag given beside the preset wins
            setattr(args, name, value)
    for kind in ("input", "output"):
        if (length := getattr(args, f"{kind}_len")) is not None:
            low, high = length_range(length, args.random_range_ratio)
            setattr(args, f"{kind}_len_min", low)
            setattr(args, f"{kind}_len_max", high)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if args.compare:
        args.peers = list(dict.fromkeys([*args.peers, "hf-generate", "hf-generate-batch"]))
    if unknown := sorted(set(args.peers) - set(PEERS)):
        raise ValueError(f"--peers: unknown {unknown}; choose from {list(PEERS)}")
    if not (1 <= args.input_len_min <= args.input_len_max and 1 <= args.output_len_min <= args.output_len_max):
        raise ValueError("--input-len-min/max and --output-len-min/max must satisfy 1 <= min <= max")
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_throughput_args(parser)
    args = parser.parse_args(argv)
    try:
        return checked(args)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    from engine.loader import resolve_model

    config = offline_config(args)  # resolves the defaults every system then shares
    vocab_size = AutoConfig.from_pretrained(resolve_model(config.model, config.load_format)).vocab_size
    workload = make_workload(args, vocab_size)
    report = new_report(args, config, workload)
    for name in sorted(set(args.peers), key=PEERS.index):  # tokmodel first: its memory is freed before peers load
        report["results"][name] = measure(name, args, config, workload, vocab_size)
    report["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)  # other jobs skew timings
    report |= compare(report["results"])
    print(json.dumps(report, indent=2))
    if args.output:
        write_outputs(report, args, config)
    return report


def new_report(args: argparse.Namespace, config: EngineConfig, workload: Workload) -> dict:
    return {
        "workload": {"num_prompts": args.num_prompts, "input_len": [args.input_len_min, args.input_len_max],
                     "output_len": [args.output_len_min, args.output_len_max], "seed": args.seed or 0,
                     "prompt_tokens": workload.num_prompt_tokens, "output_tokens": workload.num_output_tokens,
                     "ignore_eos": True, "greedy": True, "hf_batch_size": args.hf_batch_size,
                     "output_tokens_counted": "useful: each request's own output length"},
        "model": config.model or "default (SmolLM2-135M-Instruct)", "load_format": config.load_format,
        "device": config.device, "dtype": config.dtype, "kernel_backend": config.kernel_backend,
        "machine": machine_info(config.device),
        "results": {},
    }


def compare(results: dict[str, dict]) -> dict:
    """tokmodel's useful output tok/s over each transformers path's, and over the best."""
    baselines = {k: v["output_tokens_per_s"] for k, v in results.items() if k != "tokmodel"}
    if "tokmodel" not in results or not baselines:
        return {}
    ours = results["tokmodel"]["output_tokens_per_s"]
    best = max(baselines, key=baselines.get)
    return {"speedup_vs": {k: round(ours / v, 2) for k, v in baselines.items()}, "best_transformers": best,
            "speedup_vs_best_transformers": round(ours / baselines[best], 2)}


def write_outputs(report: dict, args: argparse.Namespace, config: EngineConfig) -> None:
    """The JSON, and next to it a bar chart of useful output tok/s per system."""
    path = default_result_path("throughput", config.device, config.dtype) if args.output == "auto" else Path(args.output)
    save_json(report, path)
    log(f"wrote {path}")
    machine = report["machine"]
    title = (f"{report['model']}, {config.dtype}, {config.device}\n{args.num_prompts} requests, prompts "
             f"{args.input_len_min}-{args.input_len_max}, outputs {args.output_len_min}-{args.output_len_max} tokens\n"
             f"{machine['cpu'] if config.device == 'cpu' else machine.get('gpu', '')}, "
             f"{machine['torch_threads']} torch thread(s), load average {machine['load_average_1m']}")
    save_bar_chart({k: v["output_tokens_per_s"] for k, v in report["results"].items()}, path.with_suffix(".png"),
                   title, "useful output tokens/s")


if __name__ == "__main__":
    main()
