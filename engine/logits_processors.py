"""What a request changes in its logits before penalties, as vLLM's logits processors: allowed_token_ids (every
other token banned), bad_words, logit_bias, and min_tokens (the end tokens banned until the request has that many
output tokens)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.device_copy import to_device
from engine.request import Request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def bad_words_token_ids(bad_words: list[str], tokenizer: PreTrainedTokenizerBase | None) -> list[list[int]]:
    """Each word's tokens as it starts a text and as it follows a space, so the word is banned in both places.
    (vLLM keeps the second only when it has as many tokens as the first, so "Berlin", two tokens alone but one
    after a space, would still be generated mid-text.)"""
    if bad_words and tokenizer is None:
        raise ValueError("bad_words needs a tokenizer, and this model has none")
    token_ids: list[list[int]] = []
    for word in bad_words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        token_ids.append(bare)
        if spaced != bare:
            token_ids.append(spaced)
    return token_ids


def apply_logits_processors(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place: allowed_token_ids as one mask over their rows, the rest in one accumulating scatter for the whole
    batch; a banned token gets -inf whatever its bias."""
    _apply_allowed_token_ids(logits, requests)
    rows, ids, values = [], [], []
    for row, request in enumerate(requests):
        params = request.sampling_params
        ends_banned = request.num_output_tokens < params.min_tokens
        if not (params.logit_bias or params.bad_words_token_ids or ends_banned):
            continue  # most requests: nothing to add (this loop runs over every sequence every step)
        additions = dict(params.logit_bias or {})
        banned = _banned_words(request) if params.bad_words_token_ids else []
        if ends_banned:
            banned += [*params.stop_token_ids, *([] if params.ignore_eos else params.eos_token_ids)]
        additions.update(dict.fromkeys(banned, float("-inf")))
        rows += [row] * len(additions)
        ids += additions
        values += additions.values()
    if rows:
        slots = to_device(np.asarray(rows) * logits.shape[1] + np.asarray(ids), logits.device, torch.int64)
        logits.view(-1).index_put_((slots,), to_device(values, logits.device, torch.float32), accumulate=True)


def _banned_words(request: Request) -> list[int]:
    """The last token of each bad word whose other tokens end the output so far (a one-token word: always)."""
    output = request.output_token_ids
    return [ids[-1] for ids in request.sampling_params.bad_words_token_ids
            if len(ids) == 1 or (len(ids) - 1 <= len(output) and output[len(output) - len(ids) + 1:] == ids[:-1])]


def _apply_allowed_token_ids(logits: torch.Tensor, requests: list[Request]) -> None:
    limited = [(row, r.sampling_params.allowed_token_ids) for row, r in enumerate(requests)
               if r.sampling_params.allowed_token_ids is not None]
    if not limited:
        return
    banned = torch.ones(len(limited), logits.shape[1], dtype=torch.bool, device=logits.device)
    for i, (_, allowed) in enumerate(limited):
        banned[i, to_device(allowed, logits.device, torch.int64)] = False
    rows = to_device([row for row, _ in limited], logits.device, torch.int64)
    logits[rows] = logits[rows].masked_fill(banned, float("-inf"))
