"""Model classes by the `architectures` name in config.json."""
from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def get_model_class(architectures: list[str] | None) -> type[nn.Module]:
    for name in architectures or []:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(f"model architectures {architectures} not supported; supported: {sorted(MODEL_REGISTRY)}")
