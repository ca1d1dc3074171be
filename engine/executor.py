"""What runs the model for the engine core: one ModelRunner in the engine's process (tensor_parallel_size 1), or
MultiprocExecutor over N ranks. Either answers the same calls (determine_num_blocks, allocate_kv_cache,
warm_up, capture_cuda_graphs, update_states, execute_model), so EngineCore does not know which it has.

MultiprocExecutor follows nano-vllm: rank 0 lives in the engine's process (its logits stay where the sampler
is), ranks 1..N-1 in worker processes it spawns (engine/worker.py). Each step rank 0 hands the workers the
SchedulerOutput (ids and counts, as vLLM's: each rank keeps its own persistent batch) through shared memory, then
every rank runs its shard of the forward; the model's all-reduces keep them in step. NCCL between GPUs, gloo on
the CPU.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from transformers import AutoConfig

from engine.config import EngineConfig
from engine.distributed import destroy_distributed, init_distributed
from engine.errors import EngineDeadError
from engine.loader import iter_weight_slices
from engine.logprobs import PromptLogprobRows
from engine.model_runner import ModelRunner, ModelRunnerOutput
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput
from engine.worker import BroadcastChannel, StepChannel, run_worker

logger = logging.getLogger("tokmodel.engine")
_CHANNEL_MIN_BYTES = 1 << 20
_JOIN_TIMEOUT_S = 10.0
_DEATH_WAIT_S = 1.0  # after a failed collective, how long to wait for a worker's exit to show


def make_executor(config: EngineConfig, hf_config, model_dir: Path) -> ModelRunner | MultiprocExecutor:
    check_tensor_parallel(hf_config, config.tensor_parallel_size)
    if config.node_rank > 0:
        raise ValueError(f"node_rank={config.node_rank}: only node 0 runs the engine; the other nodes run "
                         f"workers (run_headless_node, or tokmodel serve --node-rank)")
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, hf_config, _weights(config, model_dir))
    return MultiprocExecutor(config, hf_config, model_dir)


def check_tensor_parallel(hf_config, tp_size: int) -> None:
    """The model must split evenly: heads, KV heads (or ranks over KV heads: then they are replicated) and the
    MLP's width."""
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    sizes = {"attention heads": heads, "intermediate size": hf_config.intermediate_size}
    for what, size in sizes.items():
        if size % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} must divide the model's {what} ({size})")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} must divide the model's {kv_heads} KV heads, or be a "
                         f"multiple of them")


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, hf_config, model_dir: Path) -> None:
        init_method = f"tcp://{config.master_addr}:{config.master_port or _free_port()}"
        self.channel = make_channel(config)
        self.workers = start_workers(config, model_dir, range(1, config.ranks_per_node), init_method, self.channel)
        self.dead_error: EngineDeadError | None = None
        self.on_death: Callable[[EngineDeadError], None] | None = None  # called from the monitor thread
        self._closing = False
        self._serving = False  # every rank joined and loaded: the workers listen to the channel
        self._updated: SchedulerOutput | None = None  # the step update_states saw, not yet sent
        threading.Thread(target=self._monitor_workers, name="tokmodel-tp-monitor", daemon=True).start()
        try:
            if not config.device.startswith("cuda"):
                torch.set_num_threads(_threads_per_rank(config))
            tp = init_distributed(0, config.tensor_parallel_size, init_method, torch.device(config.device))
            self.channel.connect()
            self.runner = ModelRunner(config, hf_config, _weights(config, model_dir), tp)
            self._serving = True
        except BaseException:
            self.shutdown()
            raise

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    def bind_device(self) -> None:
        self.runner.bind_device()

    def determine_num_blocks(self, sampler: Sampler) -> int:
        return self._collective_rpc("determine_num_blocks", (None,), (sampler,))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._collective_rpc("allocate_kv_cache", (num_blocks,))

    def warm_up(self) -> None:
        self._collective_rpc("warm_up", ())

    def capture_cuda_graphs(self) -> None:
        self._collective_rpc("capture_cuda_graphs", ())

    def update_states(self, output: SchedulerOutput) -> None:
        """Rank 0's persistent batch now; the workers' with the step itself (one message per step)."""
        self.runner.update_states(output)
        self._updated = output

    def execute_model(self, output: SchedulerOutput,
                      prompt_rows: Sequence[PromptLogprobRows] = ()) -> ModelRunnerOutput:
        """Rank 0's output of the step; every rank runs it. A failure here is fatal (EngineDeadError): a rank
        that stopped halfway leaves the others inside a collective, so no step can be retried."""
        update, self._updated = output is self._updated, None
        return self._collective_rpc("execute_model", (output, update, prompt_rows), (output, prompt_rows))

    def _collective_rpc(self, method: str, args: tuple, local_args: tuple | None = None):
        """Run `method` on every rank: the workers with `args`, rank 0 with `local_args` (default `args`). Calls
        that run no collective of their own end in a barrier, so the channel is free again afterwards."""
        if self.dead_error is not None:
            raise self.dead_error
        try:
            self.channel.send(method, *args)
            result = getattr(self.runner, method)(*(args if local_args is None else local_args))
            if method != "execute_model":
                dist.barrier()
            return result
        except Exception as error:
            # A collective fails when a peer's connection closes: name the dead worker if that is why.
            ready = multiprocessing.connection.wait([worker.sentinel for worker in self.workers], _DEATH_WAIT_S)
            cause = self._worker_died(ready[0]) if ready else None
            raise cause or EngineDeadError(f"tensor-parallel {method} failed: {error}") from error

    def _monitor_workers(self) -> None:
        """A worker that exits while the engine runs is fatal, even while the engine idles: on_death is told."""
        if not self.workers:  # every other rank is on other nodes: their failures show in the collectives
            return
        ready = multiprocessing.connection.wait([worker.sentinel for worker in self.workers])
        error = self._worker_died(ready[0])
        if error is not None and self.on_death is not None:
            self.on_death(error)

    def _worker_died(self, sentinel: int) -> EngineDeadError | None:
        """The error naming the worker of `sentinel`; None during shutdown, when workers are meant to exit."""
        if self._closing:
            return None
        if self.dead_error is None:
            worker = next(worker for worker in self.workers if worker.sentinel == sentinel)
            worker.join(timeout=_JOIN_TIMEOUT_S)
            self.dead_error = EngineDeadError(f"tensor-parallel worker {worker.name} (pid {worker.pid}) died with "
                                              f"exit code {worker.exitcode}")
            logger.critical("%s", self.dead_error)
        return self.dead_error

    def shutdown(self) -> None:
        """Stop the workers and leave the process group; the engine cannot run afterwards."""
        if self._closing:
            return
        self._closing = True
        if self._serving and self.dead_error is None and all(worker.is_alive() for worker in self.workers):
            try:
                self.channel.send("shutdown")
            except Exception:  # the channel is gone with a dead worker: terminate below
                pass
        for worker in self.workers:
            worker.join(timeout=_JOIN_TIMEOUT_S)
            if worker.is_alive():
                worker.kill()
                worker.join()
        destroy_distributed()
        self.channel.close(unlink=True)


def make_channel(config: EngineConfig) -> StepChannel | BroadcastChannel:
    """Shared memory when every rank is on this node; torch.distributed broadcasts when some are not."""
    if config.nnodes > 1:
        return BroadcastChannel()
    events = [mp.get_context("spawn").Event() for _ in range(config.tensor_parallel_size - 1)]
    return StepChannel(events, _channel_bytes(config))


def start_workers(config: EngineConfig, model_dir: Path, ranks: range, init_method: str,
                  channel: StepChannel | BroadcastChannel) -> list[multiprocessing.Process]:
    context = mp.get_context("spawn")
    workers = [context.Process(target=run_worker, name=f"tokmodel-tp-rank{rank}", daemon=True,
                               args=(rank, init_method, config, model_dir, channel, _threads_per_rank(config)))
               for rank in ranks]
    for worker in workers:
        worker.start()
    return workers


def run_headless_node(config: EngineConfig, model_dir: Path) -> int:
    """A node past the first (node_rank > 0): its ranks' workers only, no engine; they join rank 0 at
    master_addr:master_port and serve its steps. Returns when they all end: 0 if each exited cleanly."""
    from engine.engine_core import derive_max_model_len  # engine_core imports this module

    hf_config = AutoConfig.from_pretrained(model_dir)
    check_tensor_parallel(hf_config, config.tensor_parallel_size)
    config = dataclasses.replace(config, max_model_len=derive_max_model_len(config.max_model_len, hf_config))
    first = config.node_rank * config.ranks_per_node
    init_method = f"tcp://{config.master_addr}:{config.master_port}"
    if config.ranks_per_node == 1:  # one rank: this process is its worker (one process start fewer)
        run_worker(first, init_method, config, model_dir, BroadcastChannel(), _threads_per_rank(config))
        return 0
    workers = start_workers(config, model_dir, range(first, first + config.ranks_per_node), init_method,
                            BroadcastChannel())
    for worker in workers:
        worker.join()
    return max(abs(worker.exitcode or 0) for worker in workers)


def _threads_per_rank(config: EngineConfig) -> int:
    """On the CPU the ranks of a node share its cores: each gets its part, so that they do not oversubscribe them."""
    if config.device.startswith("cuda"):
        return torch.get_num_threads()
    return max(1, torch.get_num_threads() // config.ranks_per_node)


def _weights(config: EngineConfig, model_dir: Path):
    return None if config.load_format == "dummy" else iter_weight_slices(model_dir)


def _channel_bytes(config: EngineConfig) -> int:
    """Room for the largest step: the block table (int32) of max_num_seqs full-length rows, and four int64
    arrays of max_num_batched_tokens."""
    max_blocks = -(-config.max_model_len // config.block_size) if config.max_model_len else 8192
    return _CHANNEL_MIN_BYTES + 4 * config.max_num_seqs * max_blocks + 32 * config.max_num_batched_tokens


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
