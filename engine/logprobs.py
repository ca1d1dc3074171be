"""Logprobs of the raw distribution (before penalties, bias and every filter, as vLLM's default
"raw_logprobs"), for the rows that ask for them: the sampled token's and the top `logprobs`."""
from __future__ import annotations

from typing import NamedTuple

import torch

from engine.device_copy import to_device
from engine.outputs import SampleLogprobs


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
    out: SampleLogprobs = [{} for _ in asked]
    if raw is None:
        return out
    sampled_ids = token_ids[raw.rows]
    sampled = raw.logprobs.gather(1, sampled_ids[:, None])[:, 0]
    for row, top_ids, top_values, token_id, logprob in zip(raw.rows.tolist(), raw.top_ids.tolist(),
                                                            raw.top_values.tolist(), sampled_ids.tolist(),
                                                            sampled.tolist()):
        n = asked[row]
        out[row] = dict(zip(top_ids[:n], top_values[:n])) | {token_id: logprob}
    return out
