"""The engine for an asyncio front end: EngineCore steps in a background thread, so the event loop never
waits on the model; each request's outputs come back through its own asyncio queue."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import AsyncIterator

from engine.config import EngineConfig
from engine.engine_core import EngineCore, PromptType
from engine.errors import EngineDeadError
from engine.metrics import EngineStats
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.config = config
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len
        self.model_name = config.served_model_name or (config.model or "SmolLM2-135M-Instruct").rstrip("/").split("/")[-1]
        self.num_kv_blocks = self.core.num_blocks
        self.block_size = config.block_size
        self.device = str(self.core.runner.device)
        self.dtype = config.dtype
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self.core.get_stats()
        self._running = True
        self.dead_error: BaseException | None = None  # set once the engine cannot go on
        self._thread = threading.Thread(target=self._run, name="tokmodel-engine", daemon=True)
        self._thread.start()

    @property
    def errored(self) -> bool:
        """True once the engine died: every request fails with EngineDeadError from then on."""
        return self.dead_error is not None

    @property
    def num_waiting_requests(self) -> int:
        return self._stats.num_waiting_reqs

    def get_stats(self) -> EngineStats:
        """A snapshot taken after the last step (the engine thread owns the live counters)."""
        return self._stats

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Raises ValueError before the first output if the request can never run. Closing the generator
        early (a disconnected client) aborts the request and frees its KV blocks."""
        text, token_ids, _ = self.core.process_inputs(prompt, sampling_params)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        # Already tokenized: the engine thread only re-checks the ids, it does not tokenize again.
        tokenized = {"prompt": text, "prompt_token_ids": token_ids}
        self._commands.put(("add", request_id, tokenized, sampling_params, time.time()))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def abort_all(self) -> None:
        """Aborts every request in the engine: each generate() stream still open receives a final RequestOutput
        (finished=True) whose unfinished choices have finish_reason "abort", and the KV blocks are freed."""
        self._commands.put(("abort_all",))

    def shutdown(self) -> None:
        self._running = False
        self._commands.put(("stop",))
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while self._running:
            try:
                self._take_commands(block=not self.core.has_unfinished_requests())
                if not self.core.has_unfinished_requests():
                    continue
                outputs = self.core.step()
                self._stats = self.core.get_stats()
                for output in outputs:
                    self._deliver(output.request_id, output)
            except Exception as error:  # a failed step fails the requests in flight, never the engine thread
                self._fail_all(error)

    def _take_commands(self, block: bool) -> None:
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            if command[0] == "add":
                _, request_id, prompt, params, arrival_time = command
                try:
                    self.core.add_request(request_id, prompt, params, arrival_time)
                except ValueError as error:
                    self._deliver(request_id, error)
            elif command[0] == "abort":
                self.core.abort_request(command[1])
            elif command[0] == "abort_all":
                self._abort_all()
            self._stats = self.core.get_stats()

    def _abort_all(self) -> None:
        for request_id, state in list(self.core.output_processor.states.items()):
            self.core.abort_request(request_id)
            aborted = [CompletionOutput(c.index, "", [], "abort") for c in state.choices if c.finish_reason is None]
            self._deliver(request_id, RequestOutput(request_id, state.prompt, state.prompt_token_ids, aborted,
                                                    finished=True, num_cached_tokens=state.num_cached_tokens))

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.core.output_processor.states):
            self.core.abort_request(request_id)
            self._deliver(request_id, RuntimeError(f"engine step failed: {error}"))
        self._stats = self.core.get_stats()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is None:  # the consumer is gone; its abort is already queued
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the consumer's event loop closed under it
            self._streams.pop(request_id, None)
