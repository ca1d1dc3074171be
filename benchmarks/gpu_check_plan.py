"""What benchmarks/gpu_check.py runs, at two sizes: the H100 plan (the issue's shapes, each step time-boxed so
that the whole run fits in 10 minutes) and the CPU dry run (every step at tiny sizes, so CI keeps it working)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from bench.offline import CONFIGS  # noqa: F401  (benchmarks/gpu_check_steps.py imports it from here)
from benchmarks.kernels import LLAMA_3_8B, MOE_SHAPES, MoeShape, Shape, Sweep


class Workload(NamedTuple):
    """Random prompts for the throughput run (lengths uniform in the ranges)."""
    num_prompts: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]


class Wave(NamedTuple):
    """One generate call of the compile-stall run: this many prompts, lengths uniform in the ranges."""
    num_prompts: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]


class FastPathCheck(NamedTuple):
    """Greedy requests run through each decode path of the engine, which must give the same tokens."""
    num_prompts: int
    prompt_len: tuple[int, int]
    max_tokens: int
    max_num_seqs: int  # the captured sizes: 1, 2, 4, 8, then every 8 up to this
    llama_overrides: dict  # the Llama-3.1-8B config cut down (fewer layers, narrower) so its random weights build fast


class Plan(NamedTuple):
    name: str
    device: str
    dtype: str  # of the engine and the models
    kernel_dtype: torch.dtype
    # Model dimensions replaced in every config (the dry run's tiny models); empty: the real shapes.
    model_overrides: dict
    step_time_limit_s: dict[str, int]
    pytest_args: tuple[str, ...]
    kernel_shape: Shape
    kernel_sweep: Sweep
    moe_shapes: dict[str, MoeShape]  # the fused MoE's model shapes, by name
    decode_goal_from: tuple[int, int]  # (batch, context) from which decode attention is held to its goal
    throughput: Workload
    decode_prompt_len: int
    decode_tokens: int
    serving: tuple[int, int, int]  # requests, concurrency, max_tokens
    compile_waves: tuple[Wave, ...]
    compile_engine_args: dict  # small chunks, so that long prompts are prefilled in pieces
    fast_path: FastPathCheck
    idle_time: tuple[int, int, int]  # decode batch, prompt tokens, profiled decode steps

    @property
    def is_dry_run(self) -> bool:
        return self.device == "cpu"


H100 = Plan(
    name="h100", device="cuda", dtype="bfloat16", kernel_dtype=torch.bfloat16, model_overrides={},
    # 635 s in all (610 on one GPU, where tensor_parallel skips in seconds); the steps but tests and throughput
    # end well inside theirs, so a run takes about 570 s, under the device tool's 10 minutes (or run it as two
    # calls, --steps). Sized from the GPU runs (benchmarks/results/gpu-check-nvidia-h*-2026-11-2[56].json): the
    # tests take 194 s on the H200 and about 260-290 s on the H100 (its host is slower: 96% of them in 210 s),
    # kernels 13-14 s (before the split sweep and the gemv comparison: about 26 and 44 more timings of ~0.15 s and
    # 5 gemv compiles), throughput all its limit (its peer runs against a deadline 25 s before it), decode_latency
    # 15-17 s (before it profiled a second decode, tuned the matmuls at warm-up, about a second on each engine's
    # start once Triton's cache holds the gemv configs, and timed a decode without gemv), serving 28-36 s,
    # compile_stalls 19-20 s, fast_path 30-32 s, idle_time 17-24 s.
    step_time_limit_s={"tests": 270, "kernels": 45, "throughput": 100, "decode_latency": 45, "serving": 50,
                       "compile_stalls": 25, "fast_path": 40, "idle_time": 30,
                       "tensor_parallel": 30},  # TP: a skip in seconds on one GPU; two GPUs need about 120
    # The CUDA tests: kernels in bf16 and fp16 at the larger GPU shapes (fp32 is the CPU's job), and every model
    # family against transformers and the Triton backend against the torch one.
    pytest_args=("tests/test_kernels.py", "tests/test_model_families.py", "tests/test_moe.py", "-k",
                 "not cuda-float32"),
    kernel_shape=LLAMA_3_8B,
    kernel_sweep=Sweep(decode_batches=(1, 64, 256), decode_contexts=(1024, 4096, 8192), prefill_tokens=4096,
                       elementwise_tokens=(256, 4096), moe_tokens=(1, 64, 4096), copy_elements=2**30,
                       matmul_size=8192),
    moe_shapes=MOE_SHAPES,
    decode_goal_from=(64, 1024),
    throughput=Workload(256, (100, 1024), (100, 1024)),  # nano-vllm's bench.py
    decode_prompt_len=128, decode_tokens=128,
    serving=(64, 32, 128),
    compile_waves=(Wave(1, (1, 16), (1, 8)), Wave(5, (100, 3000), (8, 32)), Wave(33, (1, 1024), (1, 64)),
                   Wave(256, (16, 2048), (16, 64)), Wave(3, (9000, 12000), (4, 8))),
    compile_engine_args={},  # the default 8192-token chunk: the last wave's prompts are longer
    fast_path=FastPathCheck(48, (16, 600), 48, 32, {"num_hidden_layers": 4, "hidden_size": 1024,
                                                   "intermediate_size": 3584, "head_dim": 128}),
    idle_time=(256, 128, 32),  # issue 12: GPU idle under 10% of decode step time at batch 256
)

TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}

CPU_DRY_RUN = Plan(
    name="cpu-dry-run", device="cpu", dtype="float32", kernel_dtype=torch.float32, model_overrides=TINY_MODEL,
    step_time_limit_s={"tests": 300, "kernels": 120, "throughput": 300, "decode_latency": 120, "serving": 180,
                       "compile_stalls": 300, "fast_path": 300, "tensor_parallel": 60, "idle_time": 120},
    pytest_args=("tests/test_model_families.py", "tests/test_kernels.py", "-k",
                 "(llama and torch) or (silu_and_mul and cpu-float32)"),
    kernel_shape=Shape(num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, hidden=64, intermediate=128),
    kernel_sweep=Sweep(decode_batches=(1, 2), decode_contexts=(32, 64), prefill_tokens=32, elementwise_tokens=(16, 32),
                       moe_tokens=(1, 16), copy_elements=2**20, matmul_size=64, split_batches=(1, 2),
                       split_contexts=(32,), gemv_rows=(1, 2)),
    moe_shapes={"tiny top-2": MoeShape(num_experts=4, top_k=2, hidden=64, intermediate=32)},
    decode_goal_from=(2, 32),
    throughput=Workload(6, (4, 24), (2, 8)),
    decode_prompt_len=8, decode_tokens=4,
    serving=(4, 2, 4),
    compile_waves=(Wave(1, (1, 4), (1, 2)), Wave(3, (5, 40), (1, 3)), Wave(1, (50, 60), (1, 2))),
    compile_engine_args={"max_num_batched_tokens": 32},
    fast_path=FastPathCheck(5, (4, 40), 6, 4, TINY_MODEL),
    idle_time=(4, 8, 3),
)
