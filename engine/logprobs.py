"""Logprobs of the raw distribution (before penalties, bias and every filter, as vLLM's default
"raw_logprobs"), for the rows that ask for them: the sampled token's and the top `logprobs`; and the prompt
logprobs of the prompt positions whose requests ask for them."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from engine.device_copy import to_device
from engine.outputs import Logprob, SampleLogprobs

if TYPE_CHECKING:
    from engine.request import Request


class RawLogprobs(NamedTuple):
    rows: torch.Tensor  # the rows that asked, in the batch
    logprobs: torch.Tensor  # their log_softmax [len(rows), vocab]
    top_values: torch.Tensor  # [len(rows), max asked]
    top_ids: torch.Tensor


def raw_logprobs(logits: torch.Tensor, asked: list[int | None]) -> RawLogprobs | None:
    """To be taken before anything changes `logits`. `asked`: per row, the number of top logprobs, or None."""
    rows = [row for row, n in enumerate(asked) if n is not None]
    if not rows:
        return None
    index = to_device(rows, logits.device, torch.int64)
    logprobs = torch.log_softmax(logits[index], dim=-1)
    top_values, top_ids = logprobs.topk(max(asked[row] for row in rows), dim=-1)
    return RawLogprobs(index, logprobs, top_values, top_ids)


def gather_logprobs(raw: RawLogprobs | None, token_ids: torch.Tensor, asked: list[int | None]) -> SampleLogprobs:
    """Per row: {token_id: logprob} of the sampled token and the top ones asked for; {} when not asked."""
    return logprob_dicts(asked, sampled_logprobs(raw, token_ids))


def sampled_logprobs(raw: RawLogprobs | None, token_ids: torch.Tensor) -> list[torch.Tensor]:
    """On the device, for the rows that asked: their sampled ids and those ids' logprobs, the top ids and top
    values; [] when no row asked."""
    if raw is None:
        return []
    sampled_ids = token_ids[raw.rows]
    return [sampled_ids, raw.logprobs.gather(1, sampled_ids[:, None])[:, 0], raw.top_ids, raw.top_values]


def logprob_dicts(asked: list[int | None], tensors: list[torch.Tensor]) -> SampleLogprobs:
    """sampled_logprobs' tensors (on the host) as one {token_id: logprob} per row; {} for the rows that did not ask."""
    out: SampleLogprobs = [{} for _ in asked]
    if not tensors:
        return out
    rows = [row for row, n in enumerate(asked) if n is not None]
    sampled_ids, sampled, top_ids, top_values = (t.tolist() for t in tensors)
    for row, ids, values, token_id, logprob in zip(rows, top_ids, top_values, sampled_ids, sampled):
        n = asked[row]
        out[row] = dict(zip(ids[:n], values[:n])) | {token_id: logprob}
    return out


PROMPT_ROWS_PER_SLICE = 256  # bounds the [rows, vocab] logits a long prompt chunk holds at once


class PromptLogprobRows(NamedTuple):
    """Prompt positions of one scheduled sequence whose logprobs a step computes: its tokens [start, stop) of
    this step (offsets from its first scheduled token), each predicting the next of target_ids."""
    row: int  # index into SchedulerOutput.req_ids
    start: int
    stop: int
    target_ids: list[int]
    num_top: int  # SamplingParams.prompt_logprobs


def prompt_logprob_rows(requests: list[Request], num_scheduled_tokens: list[int]
                        ) -> list[tuple[Request, PromptLogprobRows]]:
    """The rows of a step's scheduled requests that ask for prompt logprobs and compute prompt positions they
    have none for yet. Position t predicts prompt token t + 1, so the last prompt position (which predicts the
    first output token) has none; a preempted prompt's recompute, or a rerun of a failed step's rows, adds none
    twice."""
    wanted = []
    for row, (request, num_new) in enumerate(zip(requests, num_scheduled_tokens)):
        if request.sampling_params.prompt_logprobs is None or request.index:
            continue  # the other choices fork from choice 0, which holds the request's prompt logprobs
        computed, done = request.num_computed_tokens, len(request.prompt_logprobs)
        assert done >= min(computed, request.num_prompt_tokens - 1), "prompt logprobs would skip positions"
        first, end = max(computed, done), min(computed + num_new, request.num_prompt_tokens - 1)
        if first < end:
            wanted.append((request, PromptLogprobRows(row, first - computed, end - computed,
                                                      request.prompt_token_ids[first + 1:end + 1],
                                                      request.sampling_params.prompt_logprobs)))
    return wanted


def prompt_logprobs(hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                    target_ids: list[int], num_top: int) -> list[dict[int, Logprob]]:
    """Per row of `hidden` (the position before each target token): the target's Logprob, then the top
    `num_top` (-1: the whole vocabulary), as vLLM's prompt logprobs. Rank 1 is the most likely token."""
    out: list[dict[int, Logprob]] = []
    targets = to_device(target_ids, hidden.device, torch.int64)
    for start in range(0, len(target_ids), PROMPT_ROWS_PER_SLICE):
        logits = compute_logits(hidden[start:start + PROMPT_ROWS_PER_SLICE])
        if logits.shape[1] == 0:  # a tensor-parallel rank that does not sample: it only joins the logits' gather
            continue
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = targets[start:start + PROMPT_ROWS_PER_SLICE, None]
        target_logprobs = logprobs.gather(1, target)
        ranks = (logprobs >= target_logprobs).sum(-1)
        k = logprobs.shape[1] if num_top == -1 else num_top
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], target[:, :0])
        for token_id, logprob, rank, ids, values in zip(target[:, 0].tolist(), target_logprobs[:, 0].tolist(),
                                                        ranks.tolist(), top_ids.tolist(), top_values.tolist()):
            top = {i: Logprob(v, r) for r, (i, v) in enumerate(zip(ids, values), start=1)}
            out.append({token_id: Logprob(logprob, rank)} | top)
    return out
