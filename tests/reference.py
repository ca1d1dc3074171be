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


@torch.inference_mode()
def hf_generate_greedy(model, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with transformers' own generate and KV cache (much faster than hf_greedy on long
    outputs), ignoring EOS: the end tokens are cleared for the call."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[], pad_token_id=0)
    ids = torch.tensor([prompt_token_ids])
    # An explicit mask: without one, generate masks out every prompt token equal to pad_token_id.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt_token_ids):].tolist()
