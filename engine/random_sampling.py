"""Random sampling under temperature, min_p, top_k and top_p, exact, without sorting the vocabulary.

The filters are vLLM's, in its order: temperature scales the logits; min_p drops the tokens less likely than
min_p times the most likely; top_k keeps the k largest logits; top_p keeps the most likely tokens until their
mass reaches top_p of what min_p and top_k left. Each keeps every token at or above a threshold, ties included
(as vLLM's top_k; top_p too here, so that what it keeps does not depend on how a sort orders ties). What is
kept is therefore the top of the row, and each row is sampled one of two ways:

- From its candidates, the row's `candidates` largest logits (a top-k for the batch), when its top_k or min_p
  cuts inside them: the last candidate is filtered out, so is every token after it. The usual case with either.
- Over the whole row otherwise (temperature or top_p alone, ties past the candidates, a top_k larger than
  them): by inverse CDF over the kept tokens; for top_p by rejection, as FlashInfer's sorting-free top-p: a
  drawn token whose more likely tokens already weigh top_p is outside the nucleus, and so is every token less
  likely than it, so the row draws again from the tokens more likely than it. The first draw is accepted with
  probability at least top_p, so a row rarely draws twice.

Rows whose settings cannot cut inside the candidates go straight to the second way. Finding the rows that the
candidates turn out not to hold costs one device-to-host sync, before the one the caller makes for the tokens."""
from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from engine import vocab_chunks
from engine.device_copy import to_device
from engine.request import Request
from engine.row_random import RowRandom
from engine.sampling_params import SamplingParams

CANDIDATES = 64  # each row's largest logits, sampled from when the row's top_k or min_p cuts inside them
MAX_TOP_K_CANDIDATES = 256  # a top_k up to this widens the candidates; a larger one is served over the whole row


class SamplingSettings(NamedTuple):
    """The settings of the rows that sample at random, gathered once per step: on the device, and on the host
    (`params`) what decides which way each row goes, so that deciding needs no sync."""
    temperature: torch.Tensor  # [rows] float32, > 0
    top_k: torch.Tensor  # [rows] int64; 0: off
    top_p: torch.Tensor  # [rows] float32; 1: off
    min_p: torch.Tensor  # [rows] float32; 0: off
    params: list[SamplingParams]
    random: RowRandom

    @classmethod
    def from_requests(cls, requests: list[Request], device: torch.device) -> SamplingSettings:
        params = [r.sampling_params for r in requests]
        real = to_device([[p.temperature, p.top_p, p.min_p] for p in params], device, torch.float32)
        top_k = to_device([p.top_k for p in params], device, torch.int64)
        return cls(real[:, 0], top_k, real[:, 1], real[:, 2], params, RowRandom(requests, device))


class Rows(NamedTuple):
    """Some of the batch's rows: their numbers on the host, and the index that takes them from a device tensor
    (slice(None) when they are all the rows: nothing to copy)."""
    host: list[int]
    index: torch.Tensor | slice

    @classmethod
    def of(cls, host: list[int], num_rows: int, device: torch.device) -> Rows:
        return cls(host, slice(None) if len(host) == num_rows else to_device(host, device, torch.int64))


def sample(logits: torch.Tensor, settings: SamplingSettings, candidates: int = CANDIDATES) -> torch.Tensor:
    """One token id per row of `logits` [rows, vocab] (float32, overwritten)."""
    num_rows, device = logits.shape[0], logits.device
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    kth = torch.full((num_rows,), float("-inf"), device=device)  # top_k's threshold, where the candidates give it
    confinable = [0 < p.top_k <= MAX_TOP_K_CANDIDATES or p.min_p > 0 for p in settings.params]
    whole = [row for row, can in enumerate(confinable) if not can]
    if any(confinable):
        rows = Rows.of([row for row, can in enumerate(confinable) if can], num_rows, device)
        tokens[rows.index], kth[rows.index], held = _sample_candidates(logits, rows, settings, candidates)
        whole = sorted(whole + [row for row, is_held in zip(rows.host, held.tolist()) if not is_held])  # a sync
    if whole:
        rows = Rows.of(whole, num_rows, device)
        tokens[rows.index] = _sample_whole_rows(logits, rows, kth[rows.index], settings)
    return tokens


def _sample_candidates(logits: torch.Tensor, rows: Rows, settings: SamplingSettings,
                       candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens drawn from the rows' candidates; top_k's threshold (-inf where top_k is off or wider than the
    candidates); and whether the candidates hold every token the row keeps (where not, its token is void)."""
    vocab = logits.shape[1]
    needed = [p.top_k + 1 for p in settings.params if 0 < p.top_k <= MAX_TOP_K_CANDIDATES]  # past k-th: its ties
    values, ids = vocab_chunks.topk(_select(logits, rows), min(vocab, max([candidates, *needed])))
    width, top_k = values.shape[1], settings.top_k[rows.index]
    kth = values.gather(1, (top_k - 1).clamp(0, width - 1)[:, None])[:, 0]
    kth = torch.where((top_k > 0) & (top_k < width), kth, float("-inf"))
    weights = _kept_weights_(values, kth, settings.temperature[rows.index], settings.min_p[rows.index], True)
    chosen = _draw(_nucleus(weights, settings.top_p[rows.index]), settings.random.uniform(0, rows.index))
    held = (weights[:, -1] == 0) | (width == vocab)  # the last candidate dropped: so is every token after it
    return ids.gather(1, chosen[:, None])[:, 0], kth, held


def _sample_whole_rows(logits: torch.Tensor, rows: Rows, kth: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Tokens drawn over the whole of each row (the rows' logits are overwritten). `kth`: top_k's threshold
    where the candidates gave it, -inf elsewhere (found here for a top_k wider than the candidates)."""
    logits, vocab = _select(logits, rows), logits.shape[1]
    params = [settings.params[row] for row in rows.host]
    wide = [i for i, p in enumerate(params) if MAX_TOP_K_CANDIDATES < p.top_k < vocab]
    if wide:
        index = to_device(wide, logits.device, torch.int64)
        largest = logits[index].topk(max(params[i].top_k for i in wide), dim=-1).values
        kth[index] = largest.gather(1, settings.top_k[rows.index][index, None] - 1)[:, 0]
    cuts = any(0 < p.top_k < vocab for p in params)
    weights = _kept_weights_(logits, kth if cuts else None, settings.temperature[rows.index],
                             settings.min_p[rows.index], any(p.min_p > 0 for p in params))
    tokens = _draw(weights, settings.random.uniform(0, rows.index))
    nucleus_rows = [i for i, p in enumerate(params) if p.top_p < 1]
    if nucleus_rows:
        _redraw_outside_nucleus(weights, tokens, settings.top_p[rows.index], settings.random,
                                to_device(rows.host, logits.device, torch.int64), nucleus_rows)
    return tokens


def _select(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The rows' logits: the batch's own tensor when they are all of it (not copied), else a copy."""
    return logits if isinstance(rows.index, slice) else logits[rows.index]


def _kept_weights_(logits: torch.Tensor, kth: torch.Tensor | None, temperature: torch.Tensor, min_p: torch.Tensor,
                   uses_min_p: bool) -> torch.Tensor:
    """In place: each logit becomes its token's weight relative to the row's most likely, exp((logit - max) /
    temperature), and 0 where top_k (a logit below `kth`) or min_p (a weight below min_p) drops the token."""
    below_kth = None if kth is None else logits < kth[:, None]
    logits.sub_(logits.amax(dim=-1, keepdim=True)).div_(temperature[:, None]).exp_()
    if below_kth is not None:
        logits.masked_fill_(below_kth, 0.0)
    if uses_min_p:
        logits.masked_fill_(logits < min_p[:, None], 0.0)
    return logits


def _nucleus(weights: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`weights` [rows, n], in descending order, zeroed outside the top_p nucleus: a token stays while the tokens
    strictly more likely than it weigh less than top_p of the total (ties share the mass above the first)."""
    mass_before = weights.cumsum(dim=-1) - weights
    position = torch.arange(weights.shape[1], device=weights.device).expand_as(weights)
    starts_tie = torch.ones_like(weights, dtype=torch.bool)
    starts_tie[:, 1:] = weights[:, 1:] != weights[:, :-1]
    first_of_tie = torch.where(starts_tie, position, 0).cummax(dim=-1).values
    mass_above = mass_before.gather(1, first_of_tie)
    inside = (mass_above < top_p[:, None] * weights.sum(dim=-1, keepdim=True)) | (top_p[:, None] >= 1)
    return weights.where(inside, 0.0)


def _redraw_outside_nucleus(weights: torch.Tensor, tokens: torch.Tensor, top_p: torch.Tensor, random: RowRandom,
                            batch_rows: torch.Tensor, nucleus_rows: list[int]) -> None:
    """Rejection sampling of top_p over whole rows (`nucleus_rows` of `weights`, which are rows `batch_rows` of
    the batch), in place on `tokens`. Each draw is from the kept tokens above the row's pivot, which still hold
    its whole nucleus, so an accepted token is distributed exactly as top_p sampling."""
    limit = top_p * weights.sum(dim=-1)
    pending = to_device(nucleus_rows, weights.device, torch.int64)
    for draw in itertools.count(1):
        candidates = weights if len(nucleus_rows) == len(weights) and draw == 1 else weights[pending]  # no copy
        drawn_weight = candidates.gather(1, tokens[pending, None])
        outside = torch.where(candidates > drawn_weight, candidates, 0.0).sum(dim=-1) >= limit[pending]
        pending = pending[outside]  # a sync: the loop ends when no row is left
        if not len(pending):
            return
        above_pivot = candidates[outside]
        above_pivot.masked_fill_(above_pivot <= drawn_weight[outside], 0.0)
        weights[pending] = above_pivot
        tokens[pending] = _draw(above_pivot, random.uniform(draw, batch_rows[pending]))


def _draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of an index per row, in proportion to `weights` (never one of weight 0). A wide row
    goes in two steps, a chunk by the chunks' totals, then an index inside it, so that no cumulative sum runs
    over the whole row: the uniform's position inside the chosen chunk is again uniform."""
    num_rows, width = weights.shape
    if not vocab_chunks.is_chunked(width):
        return _search(weights.cumsum(dim=-1), uniform)
    chunks = weights.view(num_rows, width // vocab_chunks.CHUNK, vocab_chunks.CHUNK)
    totals = chunks.sum(dim=-1)
    cdf = totals.cumsum(dim=-1)
    chunk = _search(cdf, uniform)[:, None]
    chunk_total = totals.gather(1, chunk)[:, 0]
    inside = (uniform * cdf[:, -1] - (cdf.gather(1, chunk)[:, 0] - chunk_total)) / chunk_total
    chosen = vocab_chunks.chunk_values(weights, chunk)[:, 0]
    return chunk[:, 0] * vocab_chunks.CHUNK + _search(chosen.cumsum(dim=-1), inside.clamp(min=0))


def _search(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first index whose cumulative weight exceeds uniform * total (kept below the total)."""
    total = cdf[:, -1:]
    target = torch.minimum(uniform[:, None].to(cdf.dtype) * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]
