"""One sequence inside the engine: its tokens, its progress and its KV blocks."""
from __future__ import annotations

import enum
import time

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Each member holds its finish reason (None while it runs) as a plain attribute: the step reads it for
    every sequence, and a dict keyed by the member would hash it in Python each time."""
    WAITING = (1, None)
    RUNNING = (2, None)
    PREEMPTED = (3, None)
    FINISHED_STOPPED = (4, "stop")
    FINISHED_LENGTH = (5, "length")
    FINISHED_ABORTED = (6, "abort")
    FINISHED_ERROR = (7, "error")  # the request made a step fail; the others went on

    def __init__(self, number: int, finish_reason: str | None) -> None:  # number: keeps the values distinct
        self.finish_reason = finish_reason
        self.finished = finish_reason is not None


class Request:
    """A sequence the scheduler runs. A request with n > 1 choices is n of these (index 0..n-1) sharing
    parent_id; the first prefills the prompt and the others fork from it, sharing its blocks."""

    def __init__(self, request_id: str, parent_id: str, index: int, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, max_tokens: int, arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.parent_id = parent_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.all_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0  # one counter for prefill, chunks and decode (as vLLM v1)
        self.num_cached_tokens = -1  # prompt tokens served from the prefix cache, set when first scheduled
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # of the full blocks of all_token_ids, filled as blocks fill
        self.num_cached_blocks = 0  # leading blocks already offered to the prefix cache
        # Leading block ids the model runner's batch holds for this sequence; -1: it holds no row for it.
        # Copy-on-write lowers it (a held id changed); the scheduler sends the rest with the next step.
        self.num_synced_blocks = -1
        # Tokens sampled by steps that ran but whose ids the engine has not applied yet (async scheduling: at most
        # one while scheduling); the scheduler counts them as known, and the runner reads them on the device.
        self.num_output_placeholders = 0
        self.pending_forks: list[Request] = []  # sibling choices that fork from this one once its prompt is prefilled
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.penalty_state = None  # penalties.PenaltyState, made on first use by a request with penalties
        self.grammar = None  # its structured output's matcher, advanced by each sampled token
        # Logprobs of prompt tokens 1.. (sampling_params.prompt_logprobs), gathered chunk by chunk as the runner
        # computes them; a request asking for them never reads the prefix cache, so none is skipped.
        self.prompt_logprobs: list[dict] = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
