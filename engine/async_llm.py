"""The engine for an asyncio front end: EngineCore steps in a background thread, so the event loop never
waits on the model; each request's outputs come back through its own asyncio queue. Tokenization and chat
templating run in a third thread, so a long prompt never stalls the event loop either.

Tokenizers are not safe to share between threads, so each thread has its own: the engine thread the core's
(detokenization), the tokenizer thread a copy (prompts, templates), and the event loop `self.tokenizer`
(decoding logprobs, /detokenize)."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from engine.beam_search import BeamSearchInstance, BeamSearchParams
from engine.chat_template import ChatTemplate, ChatTemplateOptions
from engine.config import EngineConfig
from engine.engine_core import EngineCore, PromptType
from engine.errors import EngineDeadError
from engine.executor import MultiprocExecutor
from engine.metrics import EngineStats
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.profiler import EngineProfiler

logger = logging.getLogger("tokmodel.engine")
T = TypeVar("T")


class AsyncLLM:
    def __init__(self, config: EngineConfig) -> None:
        self._running = False  # set by _init_front_end
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._profiler: EngineProfiler | None = None  # made by the first start_profile
        # The engine thread builds the core as well as running it. On a CPU the model's parallel ops run on
        # OpenMP teams, and GNU OpenMP keeps one per thread that ever started one: a second team (the loading
        # thread's) makes it count more threads than cores, and it then wakes its threads through the kernel
        # rather than by spinning, for each of a step's hundreds of parallel ops (the server's batch-1 ITL on a
        # CPU was 37 ms instead of 22: README, "CPU fast path, second pass").
        if config.device == "cuda":  # the caller's current GPU, which a new thread does not inherit
            config = dataclasses.replace(config, device=f"cuda:{torch.cuda.current_device()}")
        built: queue.SimpleQueue = queue.SimpleQueue()
        self._front_end_ready = threading.Event()
        self._thread = threading.Thread(target=self._build_and_run, args=(config, built), name="tokmodel-engine",
                                        daemon=True)
        self._thread.start()
        try:
            core = built.get()
            if isinstance(core, BaseException):
                raise core
            self.core = core
            self._init_front_end(config, core.tokenizer, core.max_model_len, core.num_blocks,
                                 str(core.runner.device))
            self._stats = core.get_stats()
            if isinstance(core.runner, MultiprocExecutor):  # a dead worker is noticed even while the engine idles
                core.runner.on_death = self._die
        except BaseException:  # an interrupt while loading included: the engine thread shuts the core down
            self._running = False
            raise
        finally:
            self._front_end_ready.set()

    def _init_front_end(self, config: EngineConfig, tokenizer: PreTrainedTokenizerBase, max_model_len: int,
                        num_kv_blocks: int, device: str) -> None:
        """What the front end holds whatever runs the engine: tokenizers, the model's limits, the streams."""
        self.config = config
        self.tokenizer = copy.deepcopy(tokenizer)  # the event loop's
        self._prompt_tokenizer = copy.deepcopy(tokenizer)  # the tokenizer thread's
        self._chat_template = ChatTemplate(self._prompt_tokenizer)
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokmodel-tokenizer")
        self.max_model_len = max_model_len
        self.model_name = config.served_model_name or (config.model or "SmolLM2-135M-Instruct").rstrip("/").split("/")[-1]
        self.num_kv_blocks = num_kv_blocks
        self.block_size = config.block_size
        self.device = device
        self.dtype = config.dtype
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._running = True
        self.dead_error: EngineDeadError | None = None  # set once the engine cannot go on

    @property
    def errored(self) -> bool:
        """True once the engine died: every request fails with EngineDeadError from then on."""
        return self.dead_error is not None

    @property
    def num_waiting_requests(self) -> int:
        return self.get_stats().num_waiting_reqs

    def get_stats(self) -> EngineStats:
        """A snapshot taken after the last step (the engine thread owns the live counters)."""
        return self._stats

    def get_engine_stats(self) -> list[EngineStats]:
        """Per engine core (one here; one per data-parallel replica in DPAsyncLLM), for /metrics' engine label."""
        return [self._stats]

    async def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                                  options: ChatTemplateOptions = ChatTemplateOptions()) -> list[int]:
        """The prompt's token ids; tools as OpenAI's function tools (see engine.chat_template)."""
        return await self._in_tokenizer_thread(lambda _: self._chat_template.token_ids(messages, tools, options))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._in_tokenizer_thread(lambda tokenizer: tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def _in_tokenizer_thread(self, work: Callable[..., T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, work, self._prompt_tokenizer)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Raises ValueError before the first output if the request can never run, EngineDeadError once the
        engine has died. Closing the generator early (a disconnected client) aborts the request and frees its
        KV blocks."""
        if self.dead_error is not None:
            raise self.dead_error
        text, token_ids, _ = await self._in_tokenizer_thread(
            lambda tokenizer: self._process_inputs(prompt, sampling_params, tokenizer))
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        finished = False
        try:
            if self.dead_error is not None:  # died while we tokenized: its farewell missed this stream
                raise self.dead_error
            # Already tokenized: the engine thread only re-checks the ids, it does not tokenize again.
            tokenized = {"prompt": text, "prompt_token_ids": token_ids}
            self._add(request_id, tokenized, sampling_params)
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine has already dropped it
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def _process_inputs(self, prompt: PromptType, params: SamplingParams,
                        tokenizer: PreTrainedTokenizerBase) -> tuple[str | None, list[int], int]:
        """In the tokenizer thread: the prompt's text and token ids, checked (ValueError) before it queues."""
        return self.core.process_inputs(prompt, params, tokenizer)

    def _add(self, request_id: str, prompt: dict, params: SamplingParams) -> None:
        self._commands.put(("add", request_id, prompt, params, time.time()))

    async def start_profile(self, trace_dir: str) -> None:
        """Start torch.profiler over the engine (engine/profiler.py), as vLLM's AsyncLLM.start_profile. It runs on
        the engine thread: the profiler records the ops of the thread that starts it."""
        from engine.profiler import EngineProfiler

        def start() -> None:
            self._profiler = self._profiler or EngineProfiler(self.core, trace_dir)
            self._profiler.start()

        await self._in_engine_thread(start)

    async def stop_profile(self) -> Path:
        """Stop the profiler; returns the trace's path. RuntimeError when it is not running."""
        if self._profiler is None:
            raise RuntimeError("the profiler is not running")
        return await self._in_engine_thread(self._profiler.stop)

    async def _in_engine_thread(self, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", work, loop, future))
        return await future

    async def beam_search(self, prompt: PromptType, params: BeamSearchParams, request_id: str) -> RequestOutput:
        """One finished output with a choice per beam, best first (engine/beam_search.py); each step's beams run
        as requests `<request_id>-beam-<step>-<beam>`. A step that fails or is aborted ends the search with its
        finish reason. Raises as generate does."""
        arrival_time = time.time()
        text, token_ids, max_tokens = await self._in_tokenizer_thread(lambda tokenizer: self.core.process_inputs(
            prompt, SamplingParams(max_tokens=params.max_tokens), tokenizer))
        search = BeamSearchInstance(token_ids, max_tokens, params, self.core.eos_token_ids)
        steps: list[list[RequestOutput]] = []
        while not search.done:
            outputs = await asyncio.gather(*(
                self._last_output(beam.tokens, params.step_params, f"{request_id}-beam-{len(steps)}-{index}")
                for index, beam in enumerate(search.beams)))
            reasons = [out.outputs[0].finish_reason for out in outputs]
            failed = [reason for reason in reasons if reason in ("abort", "error")]
            if failed:
                return RequestOutput(request_id, text, token_ids, [CompletionOutput(0, "", [], failed[0])], True)
            search.advance(outputs)
            steps.append(outputs)
        times = [out.metrics for step in steps for out in step]
        metrics = {"arrival_time": arrival_time, "first_scheduled_time": steps[0][0].metrics["first_scheduled_time"],
                   "first_token_time": steps[0][0].metrics["first_token_time"],
                   "last_token_time": max(t["last_token_time"] for t in times), "finished_time": time.time(),
                   "num_preemptions": sum(t["num_preemptions"] for t in times)}
        return search.request_output(request_id, text, self.tokenizer, metrics)

    async def _last_output(self, token_ids: list[int], params: SamplingParams, request_id: str) -> RequestOutput:
        async for output in self.generate({"prompt_token_ids": token_ids}, params, request_id):
            last = output
        return last

    def abort(self, request_id: str) -> None:
        """Abort a request; a stream still open gets its last output, with finish_reason "abort"."""
        self._commands.put(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request in the engine, as abort() does each."""
        self._commands.put(("abort_all",))

    def shutdown(self) -> None:
        self._running = False
        self._commands.put(("stop",))
        self._thread.join(timeout=30)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():  # else it still runs the model: a worker stuck in a collective
            self.core.shutdown()

    def _build_and_run(self, config: EngineConfig, built: queue.SimpleQueue) -> None:
        """The engine thread: builds the core (handing it, or the error, to __init__ through `built`), then runs
        it. A request that fails a step fails alone (the core sees to that); anything that escapes the core is an
        error the engine cannot survive."""
        try:
            core = EngineCore(config)
        except BaseException as error:
            built.put(error)
            return
        built.put(core)
        self._front_end_ready.wait()
        if not self._running:  # the front end failed to start
            core.shutdown()
            return
        try:
            while self._running:
                self._take_commands(block=not self.core.has_unfinished_requests())
                outputs = self.core.step() if self.core.has_unfinished_requests() else []
                # The snapshot before the outputs leave: a client holding its last token finds its steps in /metrics.
                self._stats = self.core.get_stats()
                self._deliver_all([(output.request_id, output) for output in outputs])
        except Exception as error:
            self._stats = self.core.get_stats()
            self._die(error)

    def _take_commands(self, block: bool) -> None:
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            if command[0] == "add":
                self._add_request(*command[1:])
            elif command[0] == "abort":
                self._abort(command[1])
            elif command[0] == "abort_all":
                for request_id in list(self.core.output_processor.states):
                    self._abort(request_id)
            elif command[0] == "call":
                self._call(*command[1:])
            self._stats = self.core.get_stats()

    def _add_request(self, request_id: str, prompt: PromptType, params: SamplingParams, arrival_time: float) -> None:
        try:
            self.core.add_request(request_id, prompt, params, arrival_time)
        except ValueError as error:
            self._deliver(request_id, error)
        except Exception as error:  # a bug on this request's path: it fails, the engine goes on
            logger.exception("adding request %s failed", request_id)
            self.core.abort_request(request_id)  # whatever part of it got in
            self._deliver(request_id, RuntimeError(f"adding the request failed: {type(error).__name__}"))

    @staticmethod
    def _call(work: Callable[[], T], loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        try:
            result = work()
        except Exception as error:  # the caller's to handle; the engine goes on
            loop.call_soon_threadsafe(future.set_exception, error)
        else:
            loop.call_soon_threadsafe(future.set_result, result)

    def _abort(self, request_id: str) -> None:
        output = self.core.abort_request(request_id)
        if output is not None:
            self._deliver(request_id, output)

    def _die(self, error: Exception) -> None:
        """From the engine thread, or from the executor's monitor when a tensor-parallel worker dies."""
        if self.dead_error is not None:
            return
        logger.critical("the engine cannot go on: %s", error, exc_info=error)
        self.dead_error = error if isinstance(error, EngineDeadError) else EngineDeadError(f"engine failed: {error}")
        self._deliver_all([(request_id, self.dead_error) for request_id in list(self._streams)])

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand each item to its request's stream, with one wake-up of each consumer's event loop for all of
        them: waking it costs a write to its self-pipe, which done per request and step was a fifth of the
        engine thread's time under 256 streams."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, object]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:  # else the consumer is gone; its abort is already queued
                by_loop.setdefault(target[0], []).append((request_id, target[1], item))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # the consumers' event loop closed under them
                for request_id, _, _ in deliveries:
                    self._streams.pop(request_id, None)


def _put_all(deliveries: list[tuple[str, asyncio.Queue, object]]) -> None:
    for _, stream, item in deliveries:
        stream.put_nowait(item)
