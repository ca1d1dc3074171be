"""Batched sampling on the model's device, in vLLM's order: the logits processors (allowed_token_ids, bad_words,
logit_bias, min_tokens), penalties, then greedy rows by argmax and the others by random_sampling.py (temperature,
min_p, top_k, top_p). Each stage works on the whole batch at once, from settings gathered once per step; logprobs
are of the raw distribution."""
from __future__ import annotations

from typing import NamedTuple

import torch

from engine import vocab_chunks
from engine.device_copy import HostCopy, to_device
from engine.logits_processors import apply_logits_processors
from engine.logprobs import logprob_dicts, raw_logprobs, sampled_logprobs
from engine.outputs import SampleLogprobs
from engine.penalties import apply_penalties
from engine.random_sampling import CANDIDATES, SamplingSettings, sample
from engine.request import Request


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    logprobs: SampleLogprobs  # per row: {token_id: logprob} of the sampled token and the top-k; {} if not asked


class DeviceSample(NamedTuple):
    """A step's sampled tokens on the device, where the next step's decodes can read them (async scheduling),
    and their copy to the host with their logprobs, under way: to_host waits for the sampling, not for a
    forward queued after it."""
    token_ids: torch.Tensor  # [rows] int64
    host: HostCopy  # the token ids, then sampled_logprobs' tensors
    asked: list[int | None]  # per row: the number of top logprobs, or None

    def to_host(self) -> SamplerOutput:
        token_ids, *logprobs = self.host.wait()
        return SamplerOutput(token_ids.tolist(), logprob_dicts(self.asked, logprobs))


class Sampler:
    def __init__(self, candidates: int = CANDIDATES) -> None:
        self.candidates = candidates  # see random_sampling.py; tests narrow it to reach the whole-row path

    @torch.inference_mode()  # the runner's logits are inference tensors, which only inference mode may change
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: fp32 [num_rows, vocab], one row per request (forks repeat their parent's row); overwritten."""
        return self.sample(logits, requests).to_host()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> DeviceSample:
        """As __call__, leaving the tokens on the device and their copy to the host under way."""
        asked = [r.sampling_params.logprobs for r in requests]
        raw = raw_logprobs(logits, asked)
        apply_logits_processors(logits, requests)
        apply_penalties(logits, requests)
        token_ids = self._sample(logits, requests)
        return DeviceSample(token_ids, HostCopy([token_ids, *sampled_logprobs(raw, token_ids)]), asked)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        greedy = [r.sampling_params.greedy for r in requests]
        random_rows = [row for row, is_greedy in enumerate(greedy) if not is_greedy]
        if not random_rows:
            return vocab_chunks.argmax(logits)
        settings = SamplingSettings.from_requests([requests[row] for row in random_rows], logits.device)
        if len(random_rows) == len(requests):
            return sample(logits, settings, self.candidates)
        tokens = torch.empty(len(requests), dtype=torch.int64, device=logits.device)
        greedy_index = to_device([row for row, is_greedy in enumerate(greedy) if is_greedy], logits.device, torch.int64)
        random_index = to_device(random_rows, logits.device, torch.int64)
        tokens[greedy_index] = vocab_chunks.argmax(logits[greedy_index])
        tokens[random_index] = sample(logits[random_index], settings, self.candidates)
        return tokens
