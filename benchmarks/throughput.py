"""Offline throughput, as vLLM's benchmark_throughput: N random prompts through `LLM.generate`, and the same
workload through transformers on the same weights and dtype as the baseline. Prints one JSON object.

    python benchmarks/throughput.py                                  # the issue's workload on the default model
    python benchmarks/throughput.py --dtype bfloat16 --output        # also write benchmarks/results/*.json + .png
    python benchmarks/throughput.py --device cuda --load-format dummy --model benchmarks/configs/llama-3-8b.json

Workload: prompts of random token ids (fixed seed), lengths uniform in [--input-len-min, --input-len-max], each
request asking for exactly its own output length (uniform in [--output-len-min, --output-len-max]), greedy, EOS
ignored. Every system is warmed up on a tiny request first; the timed run is one call over all requests.

Systems (--peers):
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
from typing import Callable, NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from benchmarks.common import default_result_path, machine_info, save_bar_chart, save_json  # noqa: E402
from engine.config import EngineConfig  # noqa: E402

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
    rng = np.random.default_rng(args.seed)
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
    return tokmodel_runner(build_tokmodel(args, config))


def build_tokmodel(args: argparse.Namespace, config: EngineConfig):
    from engine import LLM

    engine_args = {k: v for k, v in (("block_size", args.block_size), ("max_num_seqs", args.max_num_seqs),
                                      ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
    return LLM(model=args.model, device=config.device, dtype=config.dtype, kernel_backend=args.kernel_backend,
               load_format=args.load_format, **engine_args)


def tokmodel_runner(llm) -> Callable[[Workload], None]:
    from engine import SamplingParams

    def run(workload: Workload) -> None:
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in workload.output_lens]
        outputs = llm.generate([{"prompt_token_ids": p} for p in workload.prompts], params, use_tqdm=False)
        _check_lengths([len(o.outputs[0].token_ids) for o in outputs], workload.output_lens, "tokmodel")

    return run


def load_hf_model(args: argparse.Namespace, config: EngineConfig):
    """transformers' own model on the weights TokModel loads (random weights of the same shapes for dummy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.loader import resolve_model

    model_dir = resolve_model(args.model, args.load_format)
    if args.load_format == "dummy":
        with torch.device(config.device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=config.torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=config.torch_dtype).to(config.device)
    return model.eval()


def setup_hf_generate(args: argparse.Namespace, config: EngineConfig) -> Callable[[Workload], None]:
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


class PhaseTimer:
    """Wall time per named phase, by wrapping callables in place: the engine itself is not edited.
    Phases nest (forward holds the kernels, attention holds gather and SDPA); the report says which holds which."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.originals: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        self.originals.append((owner, attr, original))

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def unwrap(self) -> None:
        for owner, attr, original in reversed(self.originals):
            setattr(owner, attr, original)
        self.originals.clear()


LINEAR = "linear (qkv, o, gate_up, down)"
# phase -> the phase it is part of; kernels are those of kernels/reference.py (kernel_backend="torch")
PROFILE_TREE = {
    "step": None, "schedule": "step", "mark_scheduled": "step", "execute_model": "step", "sample": "step",
    "scheduler.update": "step", "output_processor.process": "step", "finish_requests": "step",
    "prepare_inputs": "execute_model", "forward": "execute_model", "lm_head": "execute_model",
    "embedding": "forward", LINEAR: "forward", "rms_norm": "forward",
    "rotary_embedding": "forward", "silu_and_mul": "forward", "gelu_tanh_and_mul": "forward",
    "write_kv_cache": "forward",
    "paged_decode_attention": "forward", "prefill_attention": "forward",
    "attn: _gather_kv": "attention (decode + prefill)", "attn: _key_mask": "attention (decode + prefill)",
    "attn: _sdpa": "attention (decode + prefill)",
}


def profile_tokmodel(args: argparse.Namespace, config: EngineConfig, workload: Workload, vocab_size: int) -> dict:
    """One timed tokmodel run with every phase of a step timed (CPU: wall time is compute time, no sync needed).
    The kernels are timed for kernel_backend="torch" only (kernels/reference.py)."""
    from kernels import reference

    timer = PhaseTimer()
    for name in ("write_kv_cache", "paged_decode_attention", "prefill_attention", "rms_norm", "rotary_embedding",
                 "silu_and_mul", "gelu_tanh_and_mul"):  # before the model is built: get_ops reads the attributes
        timer.wrap(reference, name, name)
    for name in ("_gather_kv", "_key_mask", "_sdpa"):  # module globals, looked up at call time
        timer.wrap(reference, name, f"attn: {name}")
    llm = build_tokmodel(args, config)
    run = tokmodel_runner(llm)
    _instrument_engine(timer, llm.engine)
    run(tiny_workload(vocab_size))
    timer.reset()
    start = time.perf_counter()
    run(workload)
    total = time.perf_counter() - start
    timer.unwrap()
    rows = _phase_rows(timer, total)
    for name, row in rows.items():
        log(f"{name:<40} {row['s']:>8.3f} s {row['pct_of_run']:>6.1f} % {row['ms_per_step']:>9.2f} ms/step  "
            f"in {row['part_of']}")
    return {"elapsed_s": round(total, 3), "steps": timer.calls.get("step", 0),
            "output_tokens_per_s": round(workload.num_output_tokens / total, 2), "phases": rows}


def _instrument_engine(timer: PhaseTimer, core) -> None:
    from torch import nn

    runner = core.runner
    for owner, attr, name in ((core, "step", "step"), (core.scheduler, "schedule", "schedule"),
                              (core.output_processor, "mark_scheduled", "mark_scheduled"),
                              (runner, "execute_model", "execute_model"), (runner, "prepare_step", "prepare_inputs"),
                              (runner.model, "forward", "forward"), (runner.model, "compute_logits", "lm_head"),
                              (runner.model.model.embed_tokens, "forward", "embedding"), (core, "sampler", "sample"),
                              (core.scheduler, "update", "scheduler.update"),
                              (core.output_processor, "process", "output_processor.process"),
                              (core.scheduler, "finish_requests", "finish_requests"),
                              (nn.Linear, "forward", LINEAR)):  # every Linear; lm_head's share is taken out after
        timer.wrap(owner, attr, name)


def _phase_rows(timer: PhaseTimer, total: float) -> dict[str, dict]:
    seconds = dict(timer.seconds)
    seconds[LINEAR] = seconds.get(LINEAR, 0.0) - seconds.get("lm_head", 0.0)
    for parent in ("step", "execute_model", "forward"):
        children = sum(seconds.get(n, 0.0) for n, p in PROFILE_TREE.items() if p == parent)
        seconds[f"{parent}: rest"] = seconds.get(parent, 0.0) - children
    seconds["outside step (add_request, LLM loop)"] = total - seconds.get("step", 0.0)
    steps = max(timer.calls.get("step", 0), 1)
    parents = PROFILE_TREE | {f"{p}: rest": p for p in ("step", "execute_model", "forward")}
    return {name: {"s": round(seconds.get(name, 0.0), 3), "pct_of_run": round(100 * seconds.get(name, 0.0) / total, 1),
                   "ms_per_step": round(1000 * seconds.get(name, 0.0) / steps, 2), "part_of": parents.get(name)}
            for name in [*PROFILE_TREE, *(k for k in seconds if k not in PROFILE_TREE)]}


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
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path, GGUF, config .json (with --load-format dummy) or hub id; "
                                        "default: TokModel's default model")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--dtype", help="default: the engine's (bfloat16 on cuda or a fast-bf16 CPU, else float32)")
    parser.add_argument("--kernel-backend", choices=["torch", "triton"])
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, one per core); "
                        "on a machine shared with other jobs, 1 avoids stalls at thread barriers")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len-min", type=int, default=16)
    parser.add_argument("--input-len-max", type=int, default=256)
    parser.add_argument("--output-len-min", type=int, default=16)
    parser.add_argument("--output-len-max", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="of the workload")
    parser.add_argument("--hf-batch-size", type=int, default=32, help="requests per padded hf-generate batch")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated systems to run, from {','.join(PEERS)} (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="time tokmodel only, with a per-phase breakdown of its steps (model forward per op kind)")
    parser.add_argument("--output", nargs="?", const="auto",
                        help="write the JSON here (alone: benchmarks/results/throughput-<device>-<dtype>-<date>.json) "
                             "and a bar chart of output tok/s next to it (.png)")
    args = parser.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown:
        parser.error(f"--peers: unknown {unknown}; choose from {list(PEERS)}")
    if not (1 <= args.input_len_min <= args.input_len_max and 1 <= args.output_len_min <= args.output_len_max):
        parser.error("lengths must satisfy 1 <= min <= max")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoConfig

    from engine.loader import resolve_model

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, kernel_backend=args.kernel_backend,
                          load_format=args.load_format)  # resolves the defaults every system then shares
    vocab_size = AutoConfig.from_pretrained(resolve_model(args.model, args.load_format)).vocab_size
    workload = make_workload(args, vocab_size)
    report = new_report(args, config, workload)
    if args.profile:
        report["profile"] = profile_tokmodel(args, config, workload, vocab_size)
    else:
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
                     "output_len": [args.output_len_min, args.output_len_max], "seed": args.seed,
                     "prompt_tokens": workload.num_prompt_tokens, "output_tokens": workload.num_output_tokens,
                     "ignore_eos": True, "greedy": True, "hf_batch_size": args.hf_batch_size,
                     "output_tokens_counted": "useful: each request's own output length"},
        "model": args.model or "default (SmolLM2-135M-Instruct)", "load_format": args.load_format,
        "device": config.device, "dtype": config.dtype, "kernel_backend": config.kernel_backend,
        "machine": machine_info(config.device),
        "results": {},
    }


def compare(results: dict[str, dict]) -> dict:
    """tokmodel's useful output tok/s over the best transformers path's."""
    baselines = {k: v["output_tokens_per_s"] for k, v in results.items() if k != "tokmodel"}
    if "tokmodel" not in results or not baselines:
        return {}
    best = max(baselines, key=baselines.get)
    return {"best_transformers": best,
            "speedup_vs_best_transformers": round(results["tokmodel"]["output_tokens_per_s"] / baselines[best], 2)}


def write_outputs(report: dict, args: argparse.Namespace, config: EngineConfig) -> None:
    """The JSON, and next to it a bar chart of useful output tok/s per system (not for --profile)."""
    tag = config.dtype + ("-profile" if args.profile else "")
    path = default_result_path("throughput", config.device, tag) if args.output == "auto" else Path(args.output)
    save_json(report, path)
    log(f"wrote {path}")
    if report["results"]:
        machine = report["machine"]
        title = (f"{report['model']}, {config.dtype}, {config.device}\n{args.num_prompts} requests, prompts "
                 f"{args.input_len_min}-{args.input_len_max}, outputs {args.output_len_min}-{args.output_len_max} tokens\n"
                 f"{machine['cpu'] if config.device == 'cpu' else machine.get('gpu', '')}, "
                 f"{machine['torch_threads']} torch thread(s), load average {machine['load_average_1m']}")
        save_bar_chart({k: v["output_tokens_per_s"] for k, v in report["results"].items()}, path.with_suffix(".png"),
                       title, "useful output tokens/s")


if __name__ == "__main__":
    main()
