"""Data parallelism: N engine cores, each in its own process with its own model and KV cache (and its own
tensor-parallel workers, if any), behind one front end, DPAsyncLLM, which tokenizes, routes and streams.

Routing (vLLM's DP load balancing, SGLang's cache-aware router in small): a request goes to the replica that
already served its prompt's first blocks, so its prefix-cache hits survive, unless that replica carries
AFFINITY_SLACK requests more than the least loaded; otherwise to the least loaded, by requests in flight, then
KV-cache usage. Each replica checks its requests itself (a ValueError comes back as the stream's first item).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch.multiprocessing as mp
from transformers import PreTrainedTokenizerBase

from engine.async_llm import AsyncLLM
from engine.beam_search import BeamSearchParams
from engine.config import EngineConfig
from engine.engine_core import EngineCore, PromptType, tokenize_prompt
from engine.errors import EngineDeadError
from engine.loader import load_tokenizer, resolve_model
from engine.metrics import EngineStats
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

AFFINITY_SLACK = 4  # requests a replica may carry beyond the least loaded and still get its prefixes
AFFINITY_BLOCKS = 64  # leading blocks of a prompt remembered for routing
AFFINITY_ENTRIES = 1 << 16  # remembered prefixes, least recently used forgotten first
_POLL_S = 0.5  # how often the idle output reader and each idle replica check that the other side lives
_STOP_TIMEOUT_S = 30.0


class PrefixAffinityRouter:
    def __init__(self, num_replicas: int, block_size: int) -> None:
        self.num_replicas = num_replicas
        self.block_size = block_size
        self.owners: OrderedDict[int, int] = OrderedDict()  # prefix hash -> replica that last served it

    def route(self, token_ids: Sequence[int], loads: Sequence[tuple[int, float]]) -> int:
        """The replica for a prompt, given each replica's (requests in flight, KV-cache usage)."""
        hashes = self._prefix_hashes(token_ids)
        least = min(range(self.num_replicas), key=lambda i: loads[i])
        known = next((self.owners[h] for h in reversed(hashes) if h in self.owners), None)
        chosen = known if known is not None and loads[known][0] <= loads[least][0] + AFFINITY_SLACK else least
        for h in hashes:
            self.owners[h] = chosen
            self.owners.move_to_end(h)
        while len(self.owners) > AFFINITY_ENTRIES:
            self.owners.popitem(last=False)
        return chosen

    def _prefix_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """A chained hash per full leading block: equal hashes, equal prefixes (as the prefix cache's)."""
        hashes, h = [], 0
        for start in range(0, min(len(token_ids) // self.block_size, AFFINITY_BLOCKS) * self.block_size,
                           self.block_size):
            h = hash((h, tuple(token_ids[start:start + self.block_size])))
            hashes.append(h)
        return hashes


class DPAsyncLLM(AsyncLLM):
    """AsyncLLM's interface over data_parallel_size engine processes."""

    def __init__(self, config: EngineConfig) -> None:
        context = mp.get_context("spawn")
        self._running = True
        self._outputs = context.Queue()
        self._inputs = [context.Queue() for _ in range(config.data_parallel_size)]
        # Not daemons: a replica may spawn tensor-parallel workers of its own. The finalizer stops them.
        self._replicas = [context.Process(target=run_engine_core, name=f"tokmodel-dp-engine{i}",
                                          args=(i, replica_config(config, i), self._inputs[i], self._outputs))
                          for i in range(config.data_parallel_size)]
        for replica in self._replicas:
            replica.start()
        self._finalizer = weakref.finalize(self, _stop_replicas, self._inputs, self._replicas)
        try:
            max_model_len, num_blocks, device = self._wait_ready()
        except BaseException:
            self._finalizer()
            raise
        tokenizer = load_tokenizer(Path(config.tokenizer) if config.tokenizer
                                   else resolve_model(config.model, config.load_format))
        self._init_front_end(config, tokenizer, max_model_len, num_blocks, device)
        self._engine_stats = [EngineStats() for _ in self._replicas]
        self._router = PrefixAffinityRouter(len(self._replicas), config.block_size)
        self._lock = threading.Lock()  # the owners and loads: the event loop adds, the reader releases
        self._owner: dict[str, int] = {}
        self._in_flight = [0] * len(self._replicas)
        self._thread = threading.Thread(target=self._run, name="tokmodel-dp-outputs", daemon=True)
        self._thread.start()

    def get_stats(self) -> EngineStats:
        return EngineStats.total(self._engine_stats)

    def get_engine_stats(self) -> list[EngineStats]:
        return list(self._engine_stats)

    async def beam_search(self, prompt: PromptType, params: BeamSearchParams, request_id: str) -> RequestOutput:
        raise ValueError("use_beam_search is not supported with data_parallel_size > 1")

    async def start_profile(self, trace_dir: str) -> None:
        raise RuntimeError("the profiler is not supported with data_parallel_size > 1: profile one replica")

    def _process_inputs(self, prompt: PromptType, params: SamplingParams,
                        tokenizer: PreTrainedTokenizerBase) -> tuple[str | None, list[int], int]:
        """Only tokenized here, for routing: the replica checks the request."""
        text, token_ids = tokenize_prompt(prompt, tokenizer)
        return text, token_ids, 0

    def _add(self, request_id: str, prompt: dict, params: SamplingParams) -> None:
        with self._lock:
            loads = [(n, stats.kv_cache_usage) for n, stats in zip(self._in_flight, self._engine_stats)]
            replica = self._router.route(prompt["prompt_token_ids"], loads)
            self._owner[request_id] = replica
            self._in_flight[replica] += 1
        self._inputs[replica].put(("add", request_id, prompt, params, time.time()))

    def abort(self, request_id: str) -> None:
        replica = self._owner.get(request_id)
        if replica is not None:
            self._inputs[replica].put(("abort", request_id))

    def abort_all(self) -> None:
        for inputs in self._inputs:
            inputs.put(("abort_all",))

    def shutdown(self) -> None:
        self._running = False
        self._finalizer()
        self._thread.join(timeout=_STOP_TIMEOUT_S)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def _wait_ready(self) -> tuple[int, int, str]:
        """Each replica's (max_model_len, KV-cache blocks, device) once it has loaded; the first replica's."""
        ready = {}
        while len(ready) < len(self._replicas):
            index, kind, payload = self._next_message()
            if kind == "dead":
                raise RuntimeError(f"data-parallel engine {index} {payload}")
            ready[index] = payload
        return ready[0]

    def _next_message(self) -> tuple[int, str, object]:
        """The next message of any replica; a replica that exits without one is reported dead."""
        while True:
            try:
                return self._outputs.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._running:
                    return -1, "stopped", None
                for index, replica in enumerate(self._replicas):
                    if not replica.is_alive():
                        return index, "dead", f"exited with code {replica.exitcode}"

    def _run(self) -> None:
        """The reader: each replica's outputs to their streams, its stats to /metrics."""
        while self._running and self.dead_error is None:
            index, kind, payload = self._next_message()
            if kind == "outputs":
                outputs, self._engine_stats[index] = payload
                self._deliver_all([(output.request_id, output) for output in outputs])
                for output in outputs:
                    if output.finished:
                        self._release(output.request_id)
            elif kind == "error":
                request_id, error = payload
                self._deliver(request_id, error)
                self._release(request_id)
            elif kind == "dead" and self._running:
                self._die(EngineDeadError(f"data-parallel engine {index} died: {payload}"))

    def _release(self, request_id: str) -> None:
        with self._lock:
            replica = self._owner.pop(request_id, None)
            if replica is not None:
                self._in_flight[replica] -= 1


def replica_config(config: EngineConfig, index: int) -> EngineConfig:
    """Replica `index` on its own GPUs (tensor_parallel_size of them, after the replicas before it)."""
    device = config.device
    if device.startswith("cuda"):
        device = f"cuda:{index * config.tensor_parallel_size}"
    return dataclasses.replace(config, device=device, data_parallel_size=1)


def run_engine_core(index: int, config: EngineConfig, inputs: multiprocessing.Queue,
                    outputs: multiprocessing.Queue) -> None:
    """A replica's main: an EngineCore that takes commands from `inputs` and puts each step's outputs and its
    stats on `outputs`, until told to stop or its parent is gone."""
    try:
        core = EngineCore(config)
    except Exception as error:
        outputs.put((index, "dead", f"failed to start: {type(error).__name__}: {error}"))
        return
    core.runner.bind_device()
    outputs.put((index, "ready", (core.max_model_len, core.num_blocks, str(core.runner.device))))
    try:
        while (delivered := _take_commands(index, core, inputs, outputs)) is not None:
            step = core.step() if core.has_unfinished_requests() else []
            if step or delivered:
                outputs.put((index, "outputs", (delivered + step, core.get_stats())))
    except Exception as error:
        outputs.put((index, "dead", f"{type(error).__name__}: {error}"))
        raise
    finally:
        core.shutdown()


def _take_commands(index: int, core: EngineCore, inputs: multiprocessing.Queue,
                   outputs: multiprocessing.Queue) -> list | None:
    """Apply the waiting commands (wait for one while the engine idles); the outputs of aborts, or None to stop."""
    delivered = []
    block = not core.has_unfinished_requests()
    while True:
        try:
            command = inputs.get(timeout=_POLL_S) if block else inputs.get_nowait()
        except queue.Empty:
            if not block:
                return delivered
            if not multiprocessing.parent_process().is_alive():
                return None
            continue
        block = False
        if command[0] == "stop":
            return None
        if command[0] == "add":
            try:
                core.add_request(*command[1:])
            except ValueError as error:
                outputs.put((index, "error", (command[1], error)))
            except Exception as error:  # a bug on this request's path: it fails, the engine goes on
                core.abort_request(command[1])
                outputs.put((index, "error", (command[1], RuntimeError(f"adding the request failed: {error}"))))
        elif command[0] == "abort":
            delivered += [out for out in [core.abort_request(command[1])] if out is not None]
        elif command[0] == "abort_all":
            delivered += [core.abort_request(request_id) for request_id in list(core.output_processor.states)]


def _stop_replicas(inputs: list[multiprocessing.Queue], replicas: list[multiprocessing.Process]) -> None:
    for queue_, replica in zip(inputs, replicas):
        if replica.is_alive():
            queue_.put(("stop",))
    for replica in replicas:
        replica.join(timeout=_STOP_TIMEOUT_S)
        if replica.is_alive():
            replica.kill()
            replica.join()
