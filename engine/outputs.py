"""What the engine hands back to callers, shaped as vLLM's RequestOutput."""
from __future__ import annotations

from dataclasses import dataclass, field

# One dict per generated token: {token_id: logprob} holding the sampled token and the top-k.
SampleLogprobs = list[dict[int, float]]


@dataclass
class Logprob:
    """A prompt token's, or one of the top ones at its position (vLLM's Logprob)."""
    logprob: float
    rank: int  # 1 for the most likely token
    decoded_token: str | None = None


# Per prompt token: the prompt token's Logprob and the top ones; None for the first token, which nothing predicts.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", or "error" (it alone made a step fail)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: SampleLogprobs | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # Timestamps (arrival_time, first_scheduled_time, first_token_time, last_token_time, finished_time once
    # finished) and num_preemptions, for the server's per-request metrics.
    prompt_logprobs: PromptLogprobs | None = None  # when its SamplingParams.prompt_logprobs asked
    metrics: dict[str, float] = field(default_factory=dict)
