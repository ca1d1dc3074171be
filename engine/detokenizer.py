"""Incremental detokenization and stop strings for one choice of a request."""
from __future__ import annotations

import functools

from tokenizers.decoders import DecodeStream

# Prompt tokens fed to the decoder first, so the first output token decodes with the spacing it has in context.
CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turns tokens into text as they arrive, never emitting a broken UTF-8 character, and cuts the text
    at the first stop string (which is not part of the text)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool, stop: list[str],
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer.backend_tokenizer if tokenizer is not None else None
        self.stream = DecodeStream(ids=prompt_token_ids[-CONTEXT_TOKENS:], skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.include_stop_str = include_stop_str_in_output
        self.min_tokens = min_tokens  # stop strings count only once the output is longer (as vLLM)
        self.num_tokens = 0  # decoded so far
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.stop_first_chars = {s[0] for s in stop}
        self._text = ""
        self._pending: list[int] = []  # tokens not decoded yet: without stop strings, text is made when read
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        self.flush()
        return self._text

    def add_token(self, token_id: int) -> None:
        if self.tokenizer is None or self.stop_reason is not None:
            return
        self._pending.append(token_id)
        if self.stop:  # a stop string must end the sequence at this token
            self.flush()

    def flush(self) -> None:
        """Decode the pending tokens. A request that neither streams nor stops on strings decodes its text once,
        when it finishes, not one token per step; the text is the same."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for token_id in pending:
            piece = self.stream.step(self.tokenizer, token_id)
            self.num_tokens += 1
            if piece:
                old_len = len(self._text)
                self._text += piece
                if self.stop and self.num_tokens > self.min_tokens:
                    self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> None:
        """Search only where a stop string could end in the new text; it may begin in earlier tokens."""
        start = max(0, old_len - self.max_stop_len + 1)
        found = [(idx, s) for s in self.stop if (idx := self._text.find(s, start)) != -1]
        if found:
            idx, self.stop_reason = min(found)
            self._text = self._text[:idx + len(self.stop_reason) * self.include_stop_str]

    def visible_text(self, finished: bool) -> str:
        """The text that can be shown now: a tail that might still grow into a stop string is held back (unless
        the stop string is to be shown anyway)."""
        text = self.text
        if finished or not self.stop or self.include_stop_str:
            return text
        for start in range(max(0, len(text) - self.max_stop_len + 1), len(text)):
            if text[start] in self.stop_first_chars and any(s.startswith(text[start:]) for s in self.stop):
                return text[:start]
        return text


@functools.cache  # per tokenizer instance, so each thread's tokenizer has its own
def token_texts(tokenizer) -> list[str]:
    """Every token's text on its own, special tokens included (what a logprob entry shows), decoded once."""
    return [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in range(len(tokenizer))]
