"""Beam search as vLLM runs it (vllm/beam_search.py, LLM.beam_search): the engine computes one token per step for
every live beam, with the top 2 * beam_width logprobs of its distribution; the beam_width best continuations by
cumulative logprob live on, and a continuation that ends in an end token is complete. At the end the complete and
the live beams are ranked by cum_logprob / len(tokens) ** length_penalty (tokens: the prompt's and the output's).

Each step's beams are new one-token requests whose prompts extend the last step's by one token, so the prefix
cache shares every full KV block of their common prefix (the prompt's above all) by reference count
(engine/block_pool.py): a step computes only each beam's last, partial block. The drivers (LLM.beam_search,
AsyncLLM.beam_search) submit the steps; BeamSearchInstance holds one prompt's search."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

MAX_BEAM_WIDTH = 10  # 2 * beam_width logprobs per step, and the engine returns at most 20


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int | None = 16  # None: up to the model's context length
    ignore_eos: bool = False
    temperature: float = 0.0  # only the ignored sampled token depends on it: beams follow the raw logprobs
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top logprobs to return per output token (the step's, up to 2 * beam_width or this)
    # Each step's request: one token and the logprobs of the 2 * beam_width likeliest (as transformers keeps).
    step_params: SamplingParams = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Raises ValueError naming the field, as SamplingParams does (which checks max_tokens and temperature)."""
        if not (type(self.beam_width) is int and 1 <= self.beam_width <= MAX_BEAM_WIDTH):
            raise ValueError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if not (type(self.length_penalty) in (int, float) and math.isfinite(self.length_penalty)):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        SamplingParams(max_tokens=self.max_tokens)
        self.step_params = SamplingParams(max_tokens=1, temperature=self.temperature,
                                          logprobs=max(2 * self.beam_width, self.logprobs or 0),
                                          output_kind=RequestOutputKind.FINAL_ONLY)


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # the prompt's and the output's; a complete beam's end token is not among them
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per output token, the step's top logprobs
    cum_logprob: float = 0.0
    text: str | None = None  # filled when it is returned
    finish_reason: str | None = None  # "stop" (an end token) or "length"
    stop_reason: int | None = None  # the end token


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # the best beam_width, best first


def get_beam_search_score(tokens: list[int], cum_logprob: float, length_penalty: float) -> float:
    return cum_logprob / (len(tokens) ** length_penalty)


class BeamSearchInstance:
    """One prompt's search: the live beams, the complete ones and the steps taken."""

    def __init__(self, prompt_token_ids: list[int], max_tokens: int, params: BeamSearchParams,
                 eos_token_ids: frozenset[int]) -> None:
        self.prompt_token_ids = list(prompt_token_ids)
        self.prompt_len = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.beams = [BeamSearchSequence(list(prompt_token_ids))]
        self.completed: list[BeamSearchSequence] = []
        self.num_steps = 0

    @property
    def done(self) -> bool:
        return not self.beams or self.num_steps >= self.max_tokens

    def advance(self, outputs: list[RequestOutput]) -> None:
        """Takes one finished one-token output per live beam, in the order of self.beams."""
        candidates = []
        for beam, out in zip(self.beams, outputs, strict=True):
            (step_logprobs,) = out.outputs[0].logprobs
            likeliest = heapq.nlargest(2 * self.params.beam_width, step_logprobs.items(), key=lambda item: item[1])
            for token_id, logprob in likeliest:
                cum_logprob = beam.cum_logprob + logprob
                if token_id in self.eos_token_ids:
                    self.completed.append(BeamSearchSequence(beam.tokens, beam.logprobs + [step_logprobs], cum_logprob,
                                                             finish_reason="stop", stop_reason=token_id))
                else:
                    candidates.append((cum_logprob, token_id, beam, step_logprobs))
        best = heapq.nlargest(self.params.beam_width, candidates, key=lambda candidate: candidate[0])
        self.beams = [BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [step_logprobs], cum_logprob)
                      for cum_logprob, token_id, beam, step_logprobs in best]
        self.num_steps += 1

    def best(self, tokenizer) -> list[BeamSearchSequence]:
        """The beam_width best of the complete and the live beams, best first, with their text."""
        for beam in self.beams:
            beam.finish_reason = "length"
        penalty = self.params.length_penalty
        ranked = sorted(self.completed + self.beams, reverse=True,
                        key=lambda b: get_beam_search_score(b.tokens, b.cum_logprob, penalty))[:self.params.beam_width]
        for beam in ranked:
            beam.text = tokenizer.decode(beam.tokens[self.prompt_len:],
                                         skip_special_tokens=self.params.skip_special_tokens)
        return ranked

    def request_output(self, request_id: str, prompt: str | None, tokenizer,
                       metrics: dict[str, float]) -> RequestOutput:
        """The search's result as one finished output with a choice per beam, as vLLM's server returns it."""
        choices = [CompletionOutput(index, beam.text, beam.tokens[self.prompt_len:], beam.finish_reason,
                                    beam.stop_reason, beam.logprobs if self.params.logprobs is not None else None)
                   for index, beam in enumerate(self.best(tokenizer))]
        return RequestOutput(request_id, prompt, self.prompt_token_ids, choices, True, metrics=metrics)
