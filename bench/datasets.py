"""The prompts `tokmodel bench serve` sends, as vLLM's benchmark datasets: `random` (exact token counts from the
tokenizer's own word tokens), `sharegpt` (a ShareGPT-format JSON file) and `prefix-repetition` (a few long shared
prefixes, each with many suffixes: what the prefix cache saves).

Every prompt's `prompt_len` is the length of `tokenizer.encode(prompt, add_special_tokens=False)`, counted after
the text is built, so the token totals are exact whatever the tokenizer merges."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATASET_NAMES = ("random", "sharegpt", "prefix-repetition")


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int
    expected_output_len: int


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """vLLM's random lengths: uniform integers in [floor(L * (1 - r)), ceil(L * (1 + r))]."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    return max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio))


def random_requests(tokenizer: PreTrainedTokenizerBase, num_requests: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0) -> list[SampleRequest]:
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(*_inclusive(length_range(input_len, range_ratio)), size=num_requests)
    output_lens = rng.integers(*_inclusive(length_range(output_len, range_ratio)), size=num_requests)
    return [_sample(tokenizer, _words_text(tokenizer, int(n), rng), int(o)) for n, o in zip(input_lens, output_lens)]


def prefix_repetition_requests(tokenizer: PreTrainedTokenizerBase, num_requests: int, prefix_len: int,
                               suffix_len: int, num_prefixes: int, output_len: int,
                               seed: int = 0) -> list[SampleRequest]:
    """num_prefixes random prefixes, each followed by num_requests // num_prefixes random suffixes; shuffled."""
    if not 1 <= num_prefixes <= num_requests:
        raise ValueError(f"--prefix-repetition-num-prefixes must be in [1, --num-prompts], got {num_prefixes}")
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_prefixes):
        prefix = _words_text(tokenizer, prefix_len, rng)
        requests += [_sample(tokenizer, prefix + _words_text(tokenizer, suffix_len, rng), output_len)
                     for _ in range(num_requests // num_prefixes)]
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def sharegpt_requests(tokenizer: PreTrainedTokenizerBase, path: str, num_requests: int,
                      output_len: int | None = None, seed: int = 0) -> list[SampleRequest]:
    """The first human turn of each conversation as the prompt, the reply's length as the output length (or
    output_len), keeping vLLM's filter: at least 4 tokens each, prompts up to 1024, both together up to 2048."""
    entries = json.loads(Path(path).read_text())
    conversations = [e["conversations"] for e in entries if len(e.get("conversations", [])) >= 2]
    order = np.random.default_rng(seed).permutation(len(conversations))
    requests = []
    for i in order:
        prompt, reply = conversations[i][0]["value"], conversations[i][1]["value"]
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        reply_len = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if 4 <= prompt_len <= 1024 and reply_len >= (1 if output_len else 4) and prompt_len + reply_len <= 2048:
            requests.append(SampleRequest(prompt, prompt_len, reply_len))
        if len(requests) == num_requests:
            return requests
    raise ValueError(f"--dataset-path {path} has {len(requests)} usable conversations, fewer than --num-prompts "
                     f"{num_requests}")


def _inclusive(bounds: tuple[int, int]) -> tuple[int, int]:
    return bounds[0], bounds[1] + 1


def _sample(tokenizer: PreTrainedTokenizerBase, prompt: str, output_len: int) -> SampleRequest:
    return SampleRequest(prompt, len(tokenizer.encode(prompt, add_special_tokens=False)), output_len)


def _words_text(tokenizer: PreTrainedTokenizerBase, num_tokens: int, rng: np.random.Generator) -> str:
    """Text of exactly num_tokens tokens (as vLLM's random dataset: decode, re-encode, trim or extend until the
    count holds), drawn from word tokens (a space and letters), which rarely merge with their neighbours."""
    words = _word_token_ids(tokenizer)
    ids = rng.choice(words, num_tokens).tolist()
    for _ in range(8):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == num_tokens:
            return text
        ids = ids[:num_tokens] + rng.choice(words, max(0, num_tokens - len(ids))).tolist()
    return text  # still off by a merge: _sample counts the text's own length


@cache
def _word_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    words = [i for i, t in zip(ids, texts) if len(t) > 2 and t[0] == " " and t[1:].isascii() and t[1:].isalpha()]
    return np.asarray(words if len(words) >= 100 else ids)
