"""Repetition, frequency and presence penalties as vLLM applies them: repetition over the prompt's and the
output's tokens, frequency and presence over the output's. Only the tokens a request has seen are touched, by
one gather and one scatter per kind of token for the whole batch, never a pass over the vocabulary."""
from __future__ import annotations

import numpy as np
import torch

from engine.device_copy import to_device
from engine.request import Request


class PenaltyState:
    """What one request's penalties need, kept on the request and advanced by its new tokens each step, never
    rebuilt from its whole history: its distinct prompt tokens, on the device once; its distinct output tokens,
    the count of each and whether the prompt holds it too, on the host (numpy, grown by doubling), copied to
    the device with the rest of the batch's each step."""

    def __init__(self, request: Request, device: torch.device) -> None:
        self.prompt_tokens = frozenset(request.prompt_token_ids)
        self.prompt_ids = to_device(list(self.prompt_tokens), device, torch.int64)
        self.slots: dict[int, int] = {}  # output token id -> its index in the arrays below
        self.output_ids = np.zeros(16, dtype=np.int64)
        self.output_counts = np.zeros(16, dtype=np.float32)
        self.in_prompt = np.zeros(16, dtype=bool)
        self.num_counted = 0  # output tokens already counted

    @property
    def num_output_ids(self) -> int:
        return len(self.slots)

    def advance(self, request: Request) -> None:
        """Count the output tokens appended since the last call (one per step, or none on a rerun)."""
        for token in request.all_token_ids[request.num_prompt_tokens + self.num_counted:]:
            slot = self.slots.get(token)
            if slot is None:
                slot = self.slots[token] = len(self.slots)
                if slot == len(self.output_ids):
                    self._grow()
                self.output_ids[slot] = token
                self.in_prompt[slot] = token in self.prompt_tokens
            self.output_counts[slot] += 1
        self.num_counted = request.num_output_tokens

    def _grow(self) -> None:
        self.output_ids, self.output_counts, self.in_prompt = (
            np.concatenate([a, np.zeros_like(a)]) for a in (self.output_ids, self.output_counts, self.in_prompt))


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place, on the rows of the requests that set a penalty; the others are left as they are."""
    rows = [row for row, request in enumerate(requests) if request.sampling_params.uses_penalties]
    if not rows:
        return
    states = [_advanced_state(requests[row], logits.device) for row in rows]
    params = [requests[row].sampling_params for row in rows]
    penalties = to_device([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                          logits.device, torch.float32)
    flat_logits = logits.view(-1)  # indexed by flat position: on a CPU far faster than by [rows, ids]
    # Repetition over the prompt's tokens first; output tokens the prompt also holds then skip it.
    _penalise_prompt_tokens(flat_logits, logits.shape[1], rows, states, penalties[:, 0])
    _penalise_output_tokens(flat_logits, logits.shape[1], rows, states, penalties)


def _penalise_prompt_tokens(flat_logits: torch.Tensor, vocab: int, rows: list[int], states: list[PenaltyState],
                            repetition: torch.Tensor) -> None:
    row_starts, entry_rows = _entries(rows, [len(s.prompt_tokens) for s in states], vocab, flat_logits.device)
    slots = row_starts + torch.cat([s.prompt_ids for s in states])
    flat_logits[slots] = _repetition(flat_logits[slots], repetition[entry_rows])


def _penalise_output_tokens(flat_logits: torch.Tensor, vocab: int, rows: list[int], states: list[PenaltyState],
                            penalties: torch.Tensor) -> None:
    """Repetition where the prompt did not hold the token, then frequency (per count) and presence."""
    lengths = [s.num_output_ids for s in states]
    if not sum(lengths):
        return
    device = flat_logits.device
    row_starts, entry_rows = _entries(rows, lengths, vocab, device)
    slots = row_starts + _concat([s.output_ids for s in states], lengths, device, torch.int64)
    counts = _concat([s.output_counts for s in states], lengths, device, torch.float32)
    in_prompt = _concat([s.in_prompt for s in states], lengths, device, torch.bool)
    repetition, frequency, presence = penalties[entry_rows].unbind(1)
    values = flat_logits[slots]
    values = torch.where(in_prompt, values, _repetition(values, repetition))
    flat_logits[slots] = values - frequency * counts - presence


def _advanced_state(request: Request, device: torch.device) -> PenaltyState:
    if request.penalty_state is None:
        request.penalty_state = PenaltyState(request, device)
    request.penalty_state.advance(request)
    return request.penalty_state


def _entries(rows: list[int], lengths: list[int], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For entries laid out request after request (`lengths` of each): where each one's row starts in the
    flattened logits, and its request's index among `rows`."""
    entry_rows = np.repeat(np.arange(len(rows)), lengths)
    return (to_device(np.asarray(rows)[entry_rows] * vocab, device, torch.int64),
            to_device(entry_rows, device, torch.int64))


def _concat(arrays: list[np.ndarray], lengths: list[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return to_device(np.concatenate([array[:n] for array, n in zip(arrays, lengths)]), device, dtype)


def _repetition(values: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """vLLM's (and CTRL's) repetition penalty: a positive logit is divided by it, a negative one multiplied."""
    return torch.where(values > 0, values / penalty, values * penalty)
