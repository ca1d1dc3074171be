"""Independent reference generation with transformers, for tests to compare the engine against."""
from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with transformers' own KV cache, ignoring EOS (as ignore_eos=True)."""
    input_ids = torch.tensor([prompt_token_ids])
    out = model(input_ids, use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        next_id = int(out.logits[0, -1].argmax())
        tokens.append(next_id)
        out = model(torch.tensor([[next_id]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@torch.inference_mode()
def hf_logprobs(model, prompt_token_ids: list[int], output_token_ids: list[int]) -> list[torch.Tensor]:
    """log_softmax of the model's next-token distribution at each output position."""
    ids = torch.tensor([prompt_token_ids + output_token_ids])
    logits = model(ids).logits[0, len(prompt_token_ids) - 1:-1]
    return list(torch.log_softmax(logits.float(), dim=-1))
