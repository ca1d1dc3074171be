"""Grammar-constrained decoding: each sequence of a request with structured_outputs carries a grammar matcher.
Every step the rows that have one get their allowed-token bitmask filled (on the backend's threads) and applied
to their logits in one batched call before sampling; rows without a grammar cost nothing. Each sampled token
then advances its matcher. Grammars compile off the step loop: in the thread that tokenizes the request,
before it reaches the engine.

The backend is xgrammar, imported on first use, behind the few methods XGrammarBackend has (check, compile,
new_matcher, allocate_bitmask, fill_bitmask, apply_bitmask), so another one (llguidance) could stand beside it."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from engine.structured_output.params import StructuredOutputsParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine.request import Request

__all__ = ["StructuredOutputsParams", "StructuredOutputManager", "check"]


def check(params: StructuredOutputsParams) -> None:
    """Raises ValueError saying what is wrong with the schema, regex, choice or grammar (no tokenizer needed)."""
    _backend_class().check(params)


def _backend_class():
    try:
        from engine.structured_output.xgrammar_backend import XGrammarBackend
    except ImportError:
        raise ValueError("structured outputs need xgrammar, which is not installed (pip install xgrammar)") from None
    return XGrammarBackend


class StructuredOutputManager:
    def __init__(self, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._backend = None
        self._backend_lock = threading.Lock()
        self._bitmask: torch.Tensor | None = None

    def compile(self, params: StructuredOutputsParams, tokenizer: PreTrainedTokenizerBase):
        """Compiled (or cached) grammar; any thread, with that thread's own tokenizer. ValueError if invalid."""
        return self._get_backend(tokenizer).compile(params)

    def attach(self, sequences: list[Request], params: StructuredOutputsParams,
               tokenizer: PreTrainedTokenizerBase) -> None:
        """A matcher of its own for each choice."""
        grammar = self.compile(params, tokenizer)
        for sequence in sequences:
            sequence.grammar = self._backend.new_matcher(grammar)

    def apply_bitmask(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Mask, in place, every token the grammar of each row's request does not allow next."""
        rows = [row for row, request in enumerate(requests) if request.grammar is not None]
        if not rows:
            return
        if self._bitmask is None or len(self._bitmask) < len(requests):
            self._bitmask = self._backend.allocate_bitmask(max(len(requests), 2 * len(rows)))
        bitmask = self._bitmask[:len(requests)]
        self._backend.fill_bitmask([requests[row].grammar for row in rows], bitmask, rows)
        self._backend.apply_bitmask(logits, bitmask, rows)

    def accept_tokens(self, sequences: list[Request]) -> tuple[list[str], list[str]]:
        """Advance each matcher by its sequence's new token. Returns (sequences whose grammar is complete and
        that are still running: they stop now, parent ids of requests whose token the grammar refused)."""
        complete, refused = [], []
        for sequence in sequences:
            grammar = sequence.grammar
            if grammar is None or grammar.is_terminated():
                continue
            if not grammar.accept_token(sequence.all_token_ids[-1]):
                refused.append(sequence.parent_id)
            elif grammar.is_terminated() and not sequence.is_finished:
                complete.append(sequence.request_id)
        return complete, refused

    def _get_backend(self, tokenizer: PreTrainedTokenizerBase):
        with self._backend_lock:
            if self._backend is None:
                if tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer")
                self._backend = _backend_class()(tokenizer, self.vocab_size, self.eos_token_ids)
            return self._backend
