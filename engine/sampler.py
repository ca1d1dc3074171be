"""Batched sampling on the model's device: one pass over the step's logits for every request's settings."""
from __future__ import annotations

from typing import NamedTuple

import torch

from engine.outputs import SampleLogprobs
from engine.request import Request


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    logprobs: SampleLogprobs  # per row: {token_id: logprob} of the sampled token and the top-k; {} if not asked


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: fp32 [num_rows, vocab], one row per request (forks repeat their parent's row)."""
        params = [r.sampling_params for r in requests]
        want_logprobs = [p.logprobs for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_logprobs) else None
        logits = self._process(logits.clone(), requests)
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            token_ids = greedy
        else:
            token_ids = torch.where(_to_device([p.greedy for p in params], logits.device, torch.bool),
                                    greedy, self._random_sample(logits, requests))
        return SamplerOutput(token_ids.tolist(), _gather_logprobs(raw_logprobs, token_ids, want_logprobs))

    def _process(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Logit bias, min_tokens and penalties: everything that changes the distribution before temperature."""
        for row, request in enumerate(requests):
            params = request.sampling_params
            if params.logit_bias:
                ids = _to_device(list(params.logit_bias), logits.device, torch.int64)
                logits[row, ids] += _to_device(list(params.logit_bias.values()), logits.device)
            if request.num_output_tokens < params.min_tokens:
                banned = [*params.stop_token_ids, *([] if params.ignore_eos else params.eos_token_ids)]
                logits[row, banned] = float("-inf")
        if any(r.sampling_params.uses_penalties for r in requests):
            logits = _apply_penalties(logits, requests)
        return logits

    def _random_sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        device = logits.device
        temperature = _to_device([p.temperature if not p.greedy else 1.0 for p in params], device)
        logits = logits / temperature[:, None]
        if any(p.top_k or p.top_p < 1 for p in params):
            logits = _top_k_top_p(logits, _to_device([p.top_k for p in params], device, torch.int64),
                                  _to_device([p.top_p for p in params], device))
        probs = logits.softmax(dim=-1)
        if any(p.min_p for p in params):
            min_p = _to_device([p.min_p for p in params], device)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
        # Gumbel-max by exponential race: argmax(p / q), q ~ Exp(1). Seeded rows draw q from their own
        # generator, so their tokens do not depend on what else is in the batch.
        q = torch.empty_like(probs).exponential_()
        for row, request in enumerate(requests):
            if request.generator is not None and not params[row].greedy:
                q[row].exponential_(generator=request.generator)
        return (probs / q).argmax(dim=-1)


def _to_device(values: list, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row settings to the device without a sync: a plain copy from pageable memory waits for the GPU."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class PenaltyState:
    """One request's output-token counts and mask of seen tokens (prompt and output), on the device. Kept on
    the request and advanced by its new tokens each step, never rebuilt from the whole history."""

    def __init__(self, request: Request, vocab: int, device: torch.device) -> None:
        self.counts = torch.zeros(vocab, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen[_to_device(request.prompt_token_ids, device, torch.int64)] = True
        self.num_counted = 0  # output tokens already in counts

    def advance(self, request: Request) -> None:
        new = request.all_token_ids[request.num_prompt_tokens + self.num_counted:]  # usually one token
        if new:
            ids = _to_device(new, self.counts.device, torch.int64)
            self.counts.index_add_(0, ids, torch.ones(len(new), device=self.counts.device))
            self.seen[ids] = True
            self.num_counted += len(new)


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """vLLM's semantics: repetition over prompt and output tokens, presence and frequency over output only.
    Rows without penalties read a zero state: their neutral settings leave the logits as they are."""
    vocab, device = logits.shape[1], logits.device
    neutral = (torch.zeros(vocab, device=device), torch.zeros(vocab, dtype=torch.bool, device=device))
    rows = []
    for request in requests:
        if not request.sampling_params.uses_penalties:
            rows.append(neutral)
            continue
        if request.penalty_state is None:
            request.penalty_state = PenaltyState(request, vocab, device)
        request.penalty_state.advance(request)
        rows.append((request.penalty_state.counts, request.penalty_state.seen))
    counts = torch.stack([c for c, _ in rows])
    seen = torch.stack([m for _, m in rows])
    params = [r.sampling_params for r in requests]
    repetition = _to_device([p.repetition_penalty for p in params], device)[:, None]
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    frequency = _to_device([p.frequency_penalty for p in params], device)[:, None]
    presence = _to_device([p.presence_penalty for p in params], device)[:, None]
    return logits - frequency * counts - presence * (counts > 0)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask all but the top_k largest logits (0: keep all) and the smallest set whose mass reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None]
    cut = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass before it is below top_p
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _gather_logprobs(logprobs: torch.Tensor | None, token_ids: torch.Tensor, want: list[int | None]) -> SampleLogprobs:
    if logprobs is None:
        return [{} for _ in want]
    k = max(w or 0 for w in want)
    sampled = logprobs.gather(-1, token_ids[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], token_ids[:, None][:, :0])
    top_values, top_ids, ids = top_values.tolist(), top_ids.tolist(), token_ids.tolist()
    out = []
    for row, n in enumerate(want):
        if n is None:
            out.append({})
            continue
        entry = dict(zip(top_ids[row][:n], top_values[row][:n]))
        entry[ids[row]] = sampled[row]
        out.append(entry)
    return out
