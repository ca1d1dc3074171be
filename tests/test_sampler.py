"""Penalties kept incrementally per request equal penalties computed from the whole history each step."""
from __future__ import annotations

import torch

from engine.request import Request
from engine.sampler import _apply_penalties
from engine.sampling_params import SamplingParams

VOCAB = 50


def penalised_from_scratch(logits: torch.Tensor, request: Request) -> torch.Tensor:
    params = request.sampling_params
    counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long), minlength=VOCAB).float()
    seen = counts > 0
    seen[torch.tensor(request.prompt_token_ids)] = True
    rep = params.repetition_penalty
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def test_incremental_penalties_match_a_recount_of_the_history_every_step():
    torch.manual_seed(0)
    requests = [
        Request("a", "a", 0, [1, 2, 3], SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2), 10),
        Request("b", "b", 0, [4], SamplingParams(), 10),  # no penalties: its row must come out unchanged
        Request("c", "c", 0, [5, 5], SamplingParams(frequency_penalty=1.0), 10),
    ]
    for _ in range(5):
        logits = torch.randn(len(requests), VOCAB)
        out = _apply_penalties(logits.clone(), requests)
        for row, request in enumerate(requests):
            assert torch.allclose(out[row], penalised_from_scratch(logits[row], request))
        for request in requests:
            request.append_token(int(torch.randint(0, VOCAB, ())))
    assert torch.equal(out[1], logits[1])
