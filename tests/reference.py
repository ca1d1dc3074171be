"""Independent reference generation with transformers, for tests to compare the engine against."""
from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding, ignoring EOS (as ignore_eos=True). Each step reruns the whole sequence without a
    cache: slower, but it needs no KV-cache argument, whose name differs between transformers versions."""
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([prompt_token_ids + tokens]), use_cache=False).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


@torch.inference_mode()
def hf_logprobs(model, prompt_token_ids: list[int], output_token_ids: list[int]) -> list[torch.Tensor]:
    """log_softmax of the model's next-token distribution at each output position."""
    ids = torch.tensor([prompt_token_ids + output_token_ids])
    logits = model(ids).logits[0, len(prompt_token_ids) - 1:-1]
    return list(torch.log_softmax(logits.float(), dim=-1))
