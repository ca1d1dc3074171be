"""End to end: the engine on the Triton kernels gives the same greedy tokens as on the PyTorch references
(on CPU the kernels run in Triton's interpreter, so the generation is short)."""
from __future__ import annotations

import gc

import torch

from engine import LLM, SamplingParams


def test_triton_backend_generates_the_same_greedy_tokens_as_torch():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_tokens = 64 if device == "cuda" else 3
    prompts = ["Hello, my name is", "The sky is blue because"]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(device=device, dtype="float32", kernel_backend=backend)
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        # On a GPU the next engine sizes its KV cache from the free memory: this one's cache must be gone.
        del llm
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    assert outputs["triton"] == outputs["torch"]
