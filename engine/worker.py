"""A tensor-parallel worker: one process per rank 1..N-1, spawned by the engine (engine/executor.py). It holds
its shard of the model and of the KV cache and its own persistent batch, and runs what rank 0 sends it: the
start-up calls, then each step's SchedulerOutput. It never schedules or samples."""
from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
from multiprocessing.shared_memory import SharedMemory
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.distributed import IDLE_TIMEOUT, destroy_distributed, init_distributed

_HEADER = 8  # the message's length, little-endian, before its bytes
_PARENT_POLL_S = 1.0  # how often an idle worker checks that the engine is still alive


class StepChannel:
    """Rank 0 to the workers of its node: one pickled call in shared memory and an event per worker saying it is
    there (as nano-vllm). Rank 0 writes a call only after the previous one has been read: every call ends in a
    collective the workers join after reading (a step's all-reduces, or a barrier)."""

    def __init__(self, events: list[Event], size: int) -> None:
        self.events = events
        self.shm = SharedMemory(create=True, size=size)
        self.name = self.shm.name

    def __getstate__(self) -> dict:
        return {"events": self.events, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.events, self.name = state["events"], state["name"]
        self.shm = SharedMemory(name=self.name)

    def send(self, method: str, *args: Any) -> None:
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        if _HEADER + len(data) > self.shm.size:
            raise RuntimeError(f"a {method} call of {len(data)} bytes does not fit the {self.shm.size}-byte channel")
        self.shm.buf[:_HEADER] = len(data).to_bytes(_HEADER, "little")
        self.shm.buf[_HEADER:_HEADER + len(data)] = data
        for event in self.events:
            event.set()

    def connect(self) -> None:
        """Nothing to set up once the process group exists: the memory and events came with the process."""

    def receive(self, rank: int) -> tuple[str, tuple] | None:
        """The next call for this worker; None once the engine's process has gone (its workers must not linger)."""
        event = self.events[rank - 1]
        while not event.wait(_PARENT_POLL_S):
            if not multiprocessing.parent_process().is_alive():
                return None
        event.clear()
        size = int.from_bytes(self.shm.buf[:_HEADER], "little")
        return pickle.loads(self.shm.buf[_HEADER:_HEADER + size])

    def close(self, unlink: bool) -> None:
        self.shm.close()
        if unlink:
            self.shm.unlink()


class BroadcastChannel:
    """Rank 0 to every worker through torch.distributed: between nodes, where no memory is shared. Two broadcasts
    per call (its length, then its bytes) on a gloo group of their own, whose timeout outlasts any idle spell
    (a dead peer still fails it at once: its connection closes)."""

    def __init__(self) -> None:
        self.group = None

    def connect(self) -> None:
        """On every rank, in the same order, once the process group exists."""
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def send(self, method: str, *args: Any) -> None:
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), 0, group=self.group)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)

    def receive(self, rank: int) -> tuple[str, tuple]:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, 0, group=self.group)
        return pickle.loads(data.numpy().tobytes())

    def close(self, unlink: bool) -> None:
        self.group = None


def run_worker(rank: int, init_method: str, config: EngineConfig, model_dir: Path,
               channel: StepChannel | BroadcastChannel, num_threads: int) -> None:
    """A worker process's main: join the group, load this rank's shard, then serve rank 0's calls until told to
    stop. Any error ends the process, which rank 0 sees as a dead worker."""
    from transformers import AutoConfig

    from engine.loader import iter_weight_slices
    from engine.model_runner import ModelRunner

    torch.set_num_threads(num_threads)
    config = dataclasses.replace(config, device=rank_device(config, rank))
    tp = init_distributed(rank, config.tensor_parallel_size, init_method, torch.device(config.device))
    channel.connect()
    hf_config = AutoConfig.from_pretrained(model_dir)
    weights = None if config.load_format == "dummy" else iter_weight_slices(model_dir)
    runner = ModelRunner(config, hf_config, weights, tp)
    while (call := channel.receive(rank)) is not None:
        method, args = call
        if method == "shutdown":
            break
        if method == "execute_model":
            output, update, prompt_rows = args
            if update:  # once per scheduled step, as on rank 0
                runner.update_states(output)
            runner.execute_model(output, prompt_rows)
        else:
            getattr(runner, method)(*args)
            dist.barrier()
    channel.close(unlink=False)
    destroy_distributed()


def rank_device(config: EngineConfig, rank: int) -> str:
    """Each rank of a node on its own GPU: the node's first (config.device's index) plus its local rank. The CPU
    is shared."""
    if not config.device.startswith("cuda"):
        return config.device
    first = torch.device(config.device).index or 0
    return f"cuda:{first + rank % config.ranks_per_node}"
