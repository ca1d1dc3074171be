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

CANDIDATES = 64  # each row's largest logits, sampled from when the row's top_k or min_p cuts inside them
MAX_TOP_K_CANDIDATES = 256  # a top_k up to this widens the candidates; a larger one is served over the whole row


class SamplingSettings(NamedTuple):
    """The settings of the rows that sample at random, gathered once per step: on the device, and on the host
    what decides which way each row goes (no sync)."""
    temperature: torch.Tensor  # [rows] float32, > 0
    top_k: torch.Tensor  # [rows] int64; 0: off
    top_p: torch.Tensor  # [rows] float32; 1: off
    min_p: torch.Tensor  # [rows] float32; 0: off
    host_top_k: list[int]
    host_min_p: list[float]
    random: RowRandom

    @classmethod
    def from_requests(cls, requests: list[Request], device: torch.device) -> SamplingSettings:
        params = [r.sampling_params for r in requests]
        real = to_device([[p.temperature, p.top_p, p.min_p] for p in params], device, torch.float32)
        host_top_k = [p.top_k for p in params]
        return cls(real[:, 0], to_device(host_top_k, device, torch.int64), real[:, 1], real[:, 2], host_top_k,
                   [p.min_p for p in params], RowRandom(requests, device))


def sample(logits: torch.Tensor, settings: SamplingSettings, candidates: int = CANDIDATES) -> torch.Tensor:
    """One token id per row of `logits` [rows, vocab] (float32, overwritten)."""
    num_rows, vocab = logits.shape
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    kth = torch.full((num_rows,), float("-inf"), device=logits.device)  # top_k's threshold where known
    confinable = [row for row, (k, min_p) in enumerate(zip(settings.host_top_k, settings.host_min_p))
                  if 0 < k <= MAX_TOP_K_CANDIDATES or min_p > 0]
    whole = sorted(set(range(num_rows)) - set(confinable))
    if confinable:
        rows = _index(confinable, num_rows, logits.device)
        tokens[rows], kth[rows], held = _sample_candidates(_select(logits, rows), rows, settings, candidates)
        whole = sorted(whole + [row for row, is_held in zip(confinable, held.tolist()) if not is_held])  # a sync
    if whole:
        rows = _index(whole, num_rows, logits.device)
        tokens[rows] = _sample_whole_rows(_select(logits, rows), rows, kth[rows], settings)
    return tokens


def _index(rows: list[int], num_rows: int, device: torch.device) -> torch.Tensor | slice:
    return slice(None) if len(rows) == num_rows else to_device(rows, device, torch.int64)


def _select(logits: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """The rows' logits: the batch's own tensor when they are all of it (so not copied), else a copy."""
    return logits if isinstance(rows, slice) else logits[rows]


def _sample_candidates(logits: torch.Tensor, rows: torch.Tensor | slice, settings: SamplingSettings,
                       candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens drawn from each row's candidates; top_k's threshold (-inf where top_k is off or wider than the
    candidates); and whether the candidates hold every token the row keeps (where not, the token is void)."""
    vocab = logits.shape[1]
    top_k = settings.top_k[rows]
    needed = [k + 1 for k in settings.host_top_k if 0 < k <= MAX_TOP_K_CANDIDATES]  # one past k-th: ties across it
    values, ids = vocab_chunks.topk(logits, min(vocab, max([candidates, *needed])))
    width = values.shape[1]
    kth = values.gather(1, (top_k - 1).clamp(0, width - 1)[:, None])[:, 0]
    kth = torch.where((top_k > 0) & (top_k < width), kth, float("-inf"))
    weights = _kept_weights_(values, kth, settings.temperature[rows], settings.min_p[rows], uses_min_p=True)
    chosen = _draw(_nucleus(weights, settings.top_p[rows]), settings.random.uniform(0, rows))
    held = (weights[:, -1] == 0) | (width == vocab)  # the last candidate dropped: so is every token after it
    return ids.gather(1, chosen[:, None])[:, 0], kth, held


def _sample_whole_rows(logits: torch.Tensor, rows: torch.Tensor | slice, kth: torch.Tensor,
                       settings: SamplingSettings) -> torch.Tensor:
    """Tokens drawn over the whole of each row of `logits` (overwritten). `kth`: top_k's threshold where the
    candidates gave it, -inf elsewhere (computed here for a top_k wider than the candidates)."""
    vocab = logits.shape[1]
    host_rows = range(len(settings.host_top_k))[rows] if isinstance(rows, slice) else rows.tolist()
    host_top_k = [settings.host_top_k[row] for row in host_rows]
    wide = [i for i, k in enumerate(host_top_k) if k > MAX_TOP_K_CANDIDATES and k < vocab]
    if wide:
        index = to_device(wide, logits.device, torch.int64)
        largest = logits[index].topk(max(host_top_k[i] for i in wide), dim=-1).values
        kth[index] = largest.gather(1, settings.top_k[rows][index, None] - 1)[:, 0]
    uses_min_p = any(settings.host_min_p[row] > 0 for row in host_rows)
    cuts = any(0 < k < vocab for k in host_top_k)
    weights = _kept_weights_(logits, kth if cuts else None, settings.temperature[rows], settings.min_p[rows], uses_min_p)
    tokens = _draw(weights, settings.random.uniform(0, rows))
    return _redraw_outside_nucleus(weights, tokens, settings.top_p[rows], settings.random, rows)


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
                            rows: torch.Tensor | slice) -> torch.Tensor:
    """Rejection sampling of top_p over whole rows. Each draw is from the kept tokens above the row's pivot,
    which still hold its whole nucleus, so an accepted token is distributed exactly as top_p sampling."""
    limit = top_p * weights.sum(dim=-1)
    batch_rows = torch.arange(len(tokens), device=tokens.device) if isinstance(rows, slice) else rows
    pending = (top_p < 1).nonzero()[:, 0]
    for draw in itertools.count(1):
        candidates = weights if len(pending) == len(weights) else weights[pending]  # all rows: no copy
        drawn_weight = candidates.gather(1, tokens[pending, None])
        outside = torch.where(candidates > drawn_weight, candidates, 0.0).sum(dim=-1) >= limit[pending]
        pending = pending[outside]  # a sync: the loop ends when no row is left
        if not len(pending):
            return tokens
        above_pivot = candidates[outside]
        above_pivot.masked_fill_(above_pivot <= drawn_weight[outside], 0.0)
        weights[pending] = above_pivot
        tokens[pending] = _draw(above_pivot, random.uniform(draw, batch_rows[pending]))
    raise AssertionError("unreachable")


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
