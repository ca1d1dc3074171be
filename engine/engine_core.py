"""The step loop shared by the offline LLM and the server: schedule, run the model, sample, update, emit."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from engine.config import EngineConfig
from engine.device_copy import to_device
from engine.executor import make_executor
from engine.failure_isolation import find_failing_rows, raise_if_fatal, sub_output
from engine.kv_cache_manager import KVCacheManager
from engine.logits_processors import bad_words_token_ids
from engine.loader import end_token_ids, load_tokenizer, resolve_model
from engine.logprobs import prompt_logprob_rows
from engine.metrics import ITERATION_TOKENS_BUCKETS, EngineStats, HistogramCounts
from engine.model_runner import ModelRunner, ModelRunnerOutput
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import DeviceSample, Sampler, SamplerOutput
from engine.sampling_params import SamplingParams, check_token_ids
from engine.scheduler import Scheduler, SchedulerOutput
from engine.structured_output import StructuredOutputManager

PromptType = str | list[int] | dict
logger = logging.getLogger("tokmodel.engine")


class PendingTokens(NamedTuple):
    """A step's sampled tokens that the engine has not applied yet (async scheduling)."""
    sequences: list[Request]  # one per sampled row
    sample: DeviceSample


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        if config.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size={config.data_parallel_size}: one EngineCore is one replica; "
                             f"replicas are the server's (tokmodel serve --data-parallel-size, DPAsyncLLM)")
        self.config = config
        self.model_dir = resolve_model(config.model, config.load_format)
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.tokenizer = load_tokenizer(Path(config.tokenizer) if config.tokenizer else self.model_dir)
        self.vocab_size = hf_config.vocab_size
        self.max_model_len = derive_max_model_len(config.max_model_len, hf_config)
        self.eos_token_ids = frozenset(end_token_ids(self.model_dir, self.tokenizer))
        torch.manual_seed(config.seed)
        # A ModelRunner, or a MultiprocExecutor over tensor-parallel ranks: the same calls either way.
        self.runner = make_executor(dataclasses.replace(config, max_model_len=self.max_model_len), hf_config,
                                    self.model_dir)
        self.sampler = Sampler()
        self.num_blocks = self.runner.determine_num_blocks(self.sampler)
        self.runner.allocate_kv_cache(self.num_blocks)
        self.runner.warm_up()
        self.runner.capture_cuda_graphs()
        self.kv_cache_manager = KVCacheManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured_output = StructuredOutputManager(self.vocab_size, sorted(self.eos_token_ids))
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.iteration_tokens = HistogramCounts(ITERATION_TOKENS_BUCKETS)
        # Overlapped steps need the last step's sampled ids in the runner's inputs: one in-process runner.
        self.async_scheduling = config.async_scheduling and isinstance(self.runner, ModelRunner)
        if config.async_scheduling and not self.async_scheduling:
            logger.warning("async_scheduling is not supported with tensor_parallel_size > 1: steps run one by one")
        self._pending: PendingTokens | None = None

    def process_inputs(self, prompt: PromptType, params: SamplingParams,
                       tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str | None, list[int], int]:
        """Tokenize and check a request without touching engine state: safe from any thread that brings its
        own tokenizer (one instance must not serve two threads). Returns (prompt text, prompt token ids,
        max_tokens); raises ValueError when it can never run."""
        tokenizer = tokenizer or self.tokenizer
        text, token_ids = tokenize_prompt(prompt, tokenizer)
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if params.truncate_prompt_tokens is not None:
            text, token_ids = self._truncate(text, token_ids, params.truncate_prompt_tokens)
        check_token_ids("prompt", token_ids, self.vocab_size)
        params.check_vocab(self.vocab_size)
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n must be <= max_num_seqs ({self.config.max_num_seqs}), got {params.n}")
        num_prompt, limit = len(token_ids), self.max_model_len
        if params.max_tokens is not None and num_prompt + params.max_tokens > limit:
            raise ValueError(f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{num_prompt + params.max_tokens} tokens ({num_prompt} in the prompt, "
                             f"{params.max_tokens} for max_tokens). Please reduce the length of the prompt or max_tokens.")
        if num_prompt >= limit:
            raise ValueError(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                             f"{num_prompt} tokens, which leaves no room for output.")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - num_prompt
        if params.structured_outputs is not None:  # compiled here, off the step loop; the engine finds it cached
            self.structured_output.compile(params.structured_outputs, tokenizer)
        blocks_needed = -(-(num_prompt + max_tokens) // self.config.block_size)
        if blocks_needed > self.num_blocks:
            raise ValueError(f"the request needs {blocks_needed} KV-cache blocks ({num_prompt} prompt + {max_tokens} "
                             f"output tokens) but the cache has only {self.num_blocks}; lower max_tokens")
        return text, token_ids, max_tokens

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        text, token_ids, max_tokens = self.process_inputs(prompt, params)
        seq_ids = _sequence_ids(request_id, params.n)
        # Choices are named "<id>-<index>": they must not collide with another request's sequences either.
        if request_id in self.output_processor.states or any(s in self.scheduler.requests for s in seq_ids):
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = dataclasses.replace(params, eos_token_ids=self.eos_token_ids,
                                     bad_words_token_ids=bad_words_token_ids(params.bad_words, self.tokenizer))
        arrival_time = arrival_time or time.time()
        # A seeded choice samples from its own stream, seed + index (as vLLM): engine/row_random.py.
        sequences = [Request(seq_id, request_id, index, token_ids, params, max_tokens, arrival_time)
                     for index, seq_id in enumerate(seq_ids)]
        if params.structured_outputs is not None:
            self.structured_output.attach(sequences, params.structured_outputs, self.tokenizer)
        self.output_processor.add_request(request_id, text, token_ids, params, arrival_time)
        self.scheduler.add_request(sequences[0], sequences[1:])

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request and all its choices; their blocks return to the pool at once. Returns its last
        output (unfinished choices with finish_reason "abort"), or None if it is not here."""
        return self._finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[RequestOutput]:
        """One step. A request that makes the step fail fails alone (finish_reason "error"), the others are
        retried by the next step; an error the engine cannot survive raises EngineDeadError."""
        if self.async_scheduling:
            return self._step_overlapped()
        output = self.scheduler.schedule()
        self.output_processor.mark_preempted(self._requests(output.preempted_req_ids))
        if not output.req_ids:
            return []
        self.runner.update_states(output)
        self._mark_scheduled(output)
        try:
            sampled = self._execute(output)
        except Exception as error:
            return self._fail_requests(self._find_culprits(output, error))
        sequences = self.scheduler.update(output, sampled.token_ids if sampled else [])
        return self._emit(sequences, sampled.logprobs if sampled else [])

    def _step_overlapped(self) -> list[RequestOutput]:
        """Async scheduling: schedule step N+1 and launch its forward before applying step N's tokens, which
        were sampled on the device at the end of the last call. The scheduler counts each of them as one token
        (a placeholder) and the runner reads them on the device, so N+1 waits for nothing; while the device
        runs it, the host applies N's tokens (stop checks, detokenization, outputs). N+1 samples only then,
        since its penalties, seeds, grammars and min_tokens read N's tokens; sequences that N finished (or an
        abort between calls) drop their N+1 row. Outputs come one call later than the plain loop's, and are
        the same."""
        output = self.scheduler.schedule()
        self.output_processor.mark_preempted(self._requests(output.preempted_req_ids))
        step, culprits = None, []
        if output.req_ids:
            self.runner.update_states(output)
            self._mark_scheduled(output)
            sampling = self._requests(output.sample_req_ids)
            try:
                step = self._forward(output)
            except Exception as error:
                culprits = self._find_culprits(output, error)
        outputs = self._apply_pending()
        if step is not None:
            try:
                self._pending = self._sample_live(sampling, step.logits)
            except Exception as error:
                return outputs + self._fail_requests(self._find_culprits(output, error))
            self.scheduler.advance(output)
        return outputs + self._fail_requests(culprits)

    def _apply_pending(self) -> list[RequestOutput]:
        """The last step's tokens, into the scheduler and the outputs; a sequence finished or aborted since it
        was sampled drops its token."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        sampled = pending.sample.to_host()
        live = [row for row, seq in enumerate(pending.sequences) if not seq.is_finished]
        sequences = [pending.sequences[row] for row in live]
        self.scheduler.append_tokens(sequences, [sampled.token_ids[row] for row in live])
        return self._emit(sequences, [sampled.logprobs[row] for row in live])

    def _sample_live(self, sequences: list[Request], logits: torch.Tensor) -> PendingTokens | None:
        """Sample the rows of the sequences still running, leaving the tokens on the device for the next step."""
        live = [row for row, seq in enumerate(sequences) if not seq.is_finished]
        if not live:
            return None
        if len(live) < len(sequences):
            sequences = [sequences[row] for row in live]
            logits = logits[to_device(live, logits.device, torch.int64)]
        self.structured_output.apply_bitmask(logits, sequences)
        sample = self.sampler.sample(logits, sequences)
        self.runner.set_sampled_token_ids([seq.request_id for seq in sequences], sample.token_ids)
        return PendingTokens(sequences, sample)

    def _emit(self, sequences: list[Request], logprobs: list) -> list[RequestOutput]:
        """The sequences' new tokens through grammars, detokenization and stop strings, into outputs."""
        grammar_complete, grammar_refused = self.structured_output.accept_tokens(sequences)
        self.scheduler.finish_requests(grammar_complete, RequestStatus.FINISHED_STOPPED)
        processed = self.output_processor.process(sequences, logprobs)
        self.scheduler.finish_requests(processed.stopped, RequestStatus.FINISHED_STOPPED)
        self._count_tokens(sequences)
        return processed.outputs + self._fail_requests(processed.failed + grammar_refused)

    def _count_tokens(self, sequences: list[Request]) -> None:
        """As vLLM counts them: a request's prompt when its first token comes, and every token sampled."""
        if not sequences:
            return
        num_prompt = sum(s.num_prompt_tokens for s in sequences if s.num_output_tokens == 1 and s.index == 0)
        self.num_prompt_tokens += num_prompt
        self.num_generation_tokens += len(sequences)
        self.iteration_tokens.observe(num_prompt + len(sequences))

    def _mark_scheduled(self, output: SchedulerOutput) -> None:
        """A request is first scheduled in a step that gives the runner its row (new_reqs), so only those rows
        can be a first scheduling: the others are not looked at."""
        self.output_processor.mark_scheduled(self._requests([new.req_id for new in output.new_reqs]), time.time())

    def _requests(self, req_ids: list[str]) -> list[Request]:
        return [self.scheduler.requests[req_id] for req_id in req_ids]

    def _execute(self, output: SchedulerOutput) -> SamplerOutput | None:
        step = self._forward(output)
        if not output.sample_req_ids:
            return None
        sample_requests = self._requests(output.sample_req_ids)
        self.structured_output.apply_bitmask(step.logits, sample_requests)
        return self.sampler(step.logits, sample_requests)

    def _forward(self, output: SchedulerOutput) -> ModelRunnerOutput:
        requests = self._requests(output.req_ids)
        wanted = prompt_logprob_rows(requests, output.num_scheduled_tokens)
        step = self.runner.execute_model(output, [rows for _, rows in wanted])
        for (request, _), logprobs in zip(wanted, step.prompt_logprobs):
            request.prompt_logprobs += logprobs  # only the positions the request lacked
        return step

    def _find_culprits(self, output: SchedulerOutput, error: Exception) -> list[str]:
        """The requests whose rows fail the step on their own (all of them when none does). Rows of sequences
        that finished meanwhile (async scheduling) are left out."""
        raise_if_fatal(error)
        live = [row for row, req_id in enumerate(output.req_ids) if req_id in self.scheduler.requests]
        if not live:
            logger.error("step failed (%s: %s); its requests had all finished", type(error).__name__, error)
            return []
        if len(live) < len(output.req_ids):
            output = sub_output(output, live)
        rows = find_failing_rows(self._execute, output) or range(len(output.req_ids))  # none alone: the batch
        request_ids = list(dict.fromkeys(self.scheduler.requests[output.req_ids[row]].parent_id for row in rows))
        logger.error("step failed (%s: %s); failing the requests that cause it: %s", type(error).__name__, error,
                     ", ".join(request_ids), exc_info=error)
        return request_ids

    def _fail_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = (self._finish_request(request_id, RequestStatus.FINISHED_ERROR) for request_id in request_ids)
        return [out for out in outputs if out is not None]

    def _finish_request(self, request_id: str, status: RequestStatus) -> RequestOutput | None:
        state = self.output_processor.states.get(request_id)
        if state is None:
            return None
        self.scheduler.finish_requests(_sequence_ids(request_id, state.params.n), status)
        return self.output_processor.finish(request_id, status.finish_reason)

    def shutdown(self) -> None:
        """Release the model's processes and memory; the engine cannot step afterwards."""
        self.runner.shutdown()

    def get_stats(self) -> EngineStats:
        kv = self.kv_cache_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), kv.usage,
                           self.scheduler.num_preemptions, kv.prefix_cache_queries, kv.prefix_cache_hits,
                           self.num_prompt_tokens, self.num_generation_tokens, self.iteration_tokens.copy())

    def _truncate(self, text: str | None, token_ids: list[int], keep: int) -> tuple[str | None, list[int]]:
        """The prompt's last `keep` tokens (-1: max_model_len), as vLLM's truncate_prompt_tokens; the text is
        dropped once cut, since it no longer matches the tokens."""
        if keep > self.max_model_len:
            raise ValueError(f"truncate_prompt_tokens ({keep}) must be <= max_model_len ({self.max_model_len})")
        keep = self.max_model_len if keep == -1 else keep
        return (text, token_ids) if len(token_ids) <= keep else (None, token_ids[-keep:])


def tokenize_prompt(prompt: PromptType, tokenizer: PreTrainedTokenizerBase | None) -> tuple[str | None, list[int]]:
    """(prompt text or None, token ids) of a string, a list of token ids or a dict with either."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompt token ids")
        return prompt, tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt)
    raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")


def _sequence_ids(request_id: str, n: int) -> list[str]:
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def derive_max_model_len(requested: int | None, hf_config) -> int:
    """The context length to serve: the requested one, which must fit the model's, or the model's own."""
    derived = getattr(hf_config, "max_position_embeddings", None) or 2048
    if requested is None:
        return derived
    if requested > derived:
        raise ValueError(f"max_model_len={requested} exceeds the model's context length {derived}")
    return requested
