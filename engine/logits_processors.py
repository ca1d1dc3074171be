"""What a request adds to its logits before penalties, as vLLM's logits processors: logit_bias, and min_tokens
(the end tokens banned until the request has that many output tokens)."""
from __future__ import annotations

import numpy as np
import torch

from engine.device_copy import to_device
from engine.request import Request


def apply_logit_bias_and_min_tokens(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place, in one accumulating scatter for the whole batch; a banned token gets -inf whatever its bias."""
    rows, ids, values = [], [], []
    for row, request in enumerate(requests):
        params = request.sampling_params
        additions = dict(params.logit_bias or {})
        if request.num_output_tokens < params.min_tokens:
            banned = [*params.stop_token_ids, *([] if params.ignore_eos else params.eos_token_ids)]
            additions.update(dict.fromkeys(banned, float("-inf")))
        rows += [row] * len(additions)
        ids += additions
        values += additions.values()
    if rows:
        slots = to_device(np.asarray(rows) * logits.shape[1] + np.asarray(ids), logits.device, torch.int64)
        logits.view(-1).index_put_((slots,), to_device(values, logits.device, torch.float32), accumulate=True)
