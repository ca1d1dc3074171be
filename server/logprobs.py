"""The engine's per-token {token_id: logprob} dicts in OpenAI's two shapes (chat and legacy completions)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.outputs import SampleLogprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    # Special tokens stay visible: a logprob entry for an invisible token would read as "".
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: item[1], reverse=True)[:k]


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], logprobs: SampleLogprobs, k: int) -> dict:
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        top = [_chat_entry(tokenizer, t, lp) for t, lp in _top(entry, k)]
        content.append({**_chat_entry(tokenizer, token_id, entry[token_id]), "top_logprobs": top})
    return {"content": content, "refusal": None}


def _chat_entry(tokenizer: PreTrainedTokenizerBase, token_id: int, logprob: float) -> dict:
    text = _token_text(tokenizer, token_id)
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}


def completion_logprobs(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], logprobs: SampleLogprobs, k: int,
                        offset: int) -> dict:
    """text_offset counts characters from the start of the choice's text, starting at offset (echoed prompt)."""
    tokens = [_token_text(tokenizer, t) for t in token_ids]
    text_offset = []
    for token in tokens:
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens,
            "token_logprobs": [max(entry[t], -9999.0) for t, entry in zip(token_ids, logprobs)],
            "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in _top(entry, k)} for entry in logprobs],
            "text_offset": text_offset}
