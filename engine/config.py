"""The one configuration object of an engine, with vLLM's names for its fields."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    tokenizer: str | None = None  # None: the model's own
    device: str | None = None  # None: cuda when present, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda or on a CPU with fast bf16 matmul, else float32
    kernel_backend: str | None = None  # None: "triton" on cuda; on a CPU "cpu" (C kernels), "torch" without a compiler
    load_format: str = "auto"  # "auto" or "dummy" (random weights)
    seed: int = 0
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 8192 on cuda, 2048 on cpu
    max_model_len: int | None = None  # None: the model's own context length
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # CPU budget; None: 2 GiB
    num_gpu_blocks_override: int | None = None
    served_model_name: str | None = None
    enforce_eager: bool = False  # no CUDA graphs: every decode step runs eagerly
    # Tests: pad decode steps to the CUDA graph sizes and run them eagerly on the static step buffers, the path
    # a graph replays, without capture (a CPU has no graphs).
    eager_graph_padding: bool = False
    # Overlapped scheduling: step N+1 is scheduled and its forward launched before step N's tokens are applied
    # (EngineCore._step_overlapped); the same outputs as the plain loop. Off with tensor_parallel_size > 1.
    # None: on with cuda and one rank. Off on a CPU, where the forward runs as it is called, so nothing overlaps
    # and every token would reach its client one step later.
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1  # ranks the model is split over (engine/executor.py)
    data_parallel_size: int = 1  # engine replicas behind one server (engine/data_parallel.py)
    nnodes: int = 1  # machines the tensor-parallel ranks span, tensor_parallel_size / nnodes on each
    node_rank: int = 0  # this machine's index; node 0 runs the engine, the others only workers
    master_addr: str = "127.0.0.1"  # where rank 0 listens for the other ranks to join
    master_port: int | None = None  # None: a free port (one node only)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.kernel_backend not in (None, "torch", "triton", "cpu"):
            raise ValueError(f"kernel_backend must be 'torch', 'triton' or 'cpu', got {self.kernel_backend!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("tensor_parallel_size", "data_parallel_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be a multiple of "
                             f"nnodes={self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("master_port is required with nnodes > 1: every node must name the same one")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        on_cuda = self.device.startswith("cuda")
        gpus_needed = self.ranks_per_node * self.data_parallel_size
        if on_cuda and gpus_needed > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} over nnodes={self.nnodes} with "
                             f"data_parallel_size={self.data_parallel_size} needs {gpus_needed} GPUs on this node, "
                             f"which has {torch.cuda.device_count()}")
        if self.kernel_backend is None:
            self.kernel_backend = "triton" if on_cuda else "cpu" if cpu_kernels_available() else "torch"
        if self.kernel_backend == "cpu" and on_cuda:
            raise ValueError("kernel_backend 'cpu' runs on the CPU: use 'triton' or 'torch' with device cuda")
        if self.dtype is None:
            self.dtype = "bfloat16" if on_cuda or cpu_has_fast_bf16() else "float32"
        if self.async_scheduling is None:
            self.async_scheduling = on_cuda and self.tensor_parallel_size == 1
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if on_cuda else 2048
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def torch_dtype(self) -> torch.dtype:
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                  "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32}
        if self.dtype not in dtypes:
            raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {self.dtype!r}")
        return dtypes[self.dtype]


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX makes bf16 matmul several times faster than fp32 on x86."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_kernels_available() -> bool:
    """Whether the CPU's compiled kernels (kernels/cpu/) build and load here: they need a C compiler."""
    from kernels import cpu_ops  # builds them on first use (about a second), cached afterwards

    return cpu_ops.available()
