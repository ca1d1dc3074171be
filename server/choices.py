"""Gathers the engine's DELTA outputs per choice, for full responses and for the usage of streamed ones."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import CompletionOutput, PromptLogprobs, RequestOutput


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class Collector:
    """Choice i of prompt p is choice p * n + i of the response, as OpenAI numbers them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.choices: dict[int, Choice] = {}
        self.prompt_token_ids: dict[int, list[int]] = {}
        self.prompt_logprobs: dict[int, PromptLogprobs] = {}  # given with a prompt's first output
        self.cached_tokens: dict[int, int] = {}

    def add(self, prompt_index: int, out: RequestOutput) -> list[tuple[int, CompletionOutput, bool]]:
        """Records one output; returns (response choice index, delta, whether it is the choice's first)."""
        self.prompt_token_ids[prompt_index] = out.prompt_token_ids
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = out.prompt_logprobs
        self.cached_tokens[prompt_index] = out.num_cached_tokens
        deltas = []
        for delta in out.outputs:
            index = prompt_index * self.n + delta.index
            first = index not in self.choices
            choice = self.choices.setdefault(index, Choice())
            choice.text += delta.text
            choice.token_ids += delta.token_ids
            choice.logprobs += delta.logprobs or []
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            deltas.append((index, delta, first))
        return deltas

    def sorted_choices(self) -> list[tuple[int, Choice]]:
        return sorted(self.choices.items())

    def prompt_of(self, index: int) -> int:
        return index // self.n

    def usage(self) -> dict:
        prompt_tokens = sum(map(len, self.prompt_token_ids.values()))
        completion_tokens = sum(len(choice.token_ids) for choice in self.choices.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}

    def choice_usage(self, index: int) -> dict:
        """One choice's usage so far, as vLLM's continuous_usage_stats give it on each chunk: its prompt and its
        own tokens."""
        prompt_tokens = len(self.prompt_token_ids[self.prompt_of(index)])
        completion_tokens = len(self.choices[index].token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}
