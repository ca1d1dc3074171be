"""The engine's logprobs in the shapes clients read: per generated token {token_id: logprob} in OpenAI's two
shapes (chat and legacy completions), and vLLM's prompt logprobs."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.outputs import PromptLogprobs, SampleLogprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TokenName = Callable[[int], str]  # how a logprob entry shows a token
_FLOOR = -9999.0  # -inf is no JSON number: vLLM's floor


def token_name(tokenizer: PreTrainedTokenizerBase, as_token_ids: bool) -> TokenName:
    """The token's text (special tokens stay visible: an entry for an invisible token would read as ""), or
    "token_id:<id>" with vLLM's return_tokens_as_token_ids, for tokens that do not decode to text on their own."""
    if as_token_ids:
        return lambda token_id: f"token_id:{token_id}"
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: item[1], reverse=True)[:k]


def chat_logprobs(name: TokenName, token_ids: list[int], logprobs: SampleLogprobs, k: int) -> dict:
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        top = [_chat_entry(name, t, lp) for t, lp in _top(entry, k)]
        content.append({**_chat_entry(name, token_id, entry[token_id]), "top_logprobs": top})
    return {"content": content, "refusal": None}


def _chat_entry(name: TokenName, token_id: int, logprob: float) -> dict:
    text = name(token_id)
    return {"token": text, "logprob": max(logprob, _FLOOR), "bytes": list(text.encode())}


def completion_logprobs(name: TokenName, token_ids: list[int], logprobs: list[dict[int, float] | None], k: int,
                        offset: int) -> dict:
    """As OpenAI's legacy API: per token its logprob and up to k + 1 alternatives (the token itself first, then
    the top k); None for an echoed first prompt token, which nothing predicts. text_offset counts characters from
    the start of the choice's text, starting at offset."""
    tokens = [name(t) for t in token_ids]
    text_offset = []
    for token in tokens:
        text_offset.append(offset)
        offset += len(token)
    return {"tokens": tokens,
            "token_logprobs": [None if entry is None else max(entry[t], _FLOOR) for t, entry in zip(token_ids, logprobs)],
            "top_logprobs": [None if entry is None else
                             {name(t): max(lp, _FLOOR) for t, lp in [(token_id, entry[token_id]), *_top(entry, k)]}
                             for token_id, entry in zip(token_ids, logprobs)],
            "text_offset": text_offset}


def prompt_logprobs_json(prompt_logprobs: PromptLogprobs | None) -> list[dict | None] | None:
    """vLLM's shape: per prompt token null (the first) or {token_id: {"logprob", "rank", "decoded_token"}}."""
    if prompt_logprobs is None:
        return None
    return [None if position is None else
            {str(token_id): {"logprob": max(lp.logprob, _FLOOR), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for token_id, lp in position.items()}
            for position in prompt_logprobs]


def sample_entries(prompt_logprobs: PromptLogprobs) -> list[dict[int, float] | None]:
    """Prompt logprobs as the per-token {token_id: logprob} entries of generated tokens, for echo."""
    return [None if position is None else {t: lp.logprob for t, lp in position.items()} for position in prompt_logprobs]
