"""engine/layers/moe.py's FusedMoE against transformers' own sparse MoE blocks (Mixtral, Qwen3-MoE, OLMoE, and
Qwen2-MoE for the shared expert) on the same random weights, loaded by the names transformers saves them under."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
import transformers
from safetensors.torch import load_file

from engine.layers.moe import FusedMoE, fused_topk
from kernels import get_ops

SIZES = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "vocab_size": 64}


class Family(NamedTuple):
    config: transformers.PretrainedConfig
    model_class: type
    block_prefix: str  # where the block's weights sit in the saved checkpoint
    layer_args: Callable[[transformers.PretrainedConfig], dict]  # FusedMoE's sizes, as a model file reads them


FAMILIES = {
    "mixtral": Family(
        transformers.MixtralConfig(**SIZES, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
        transformers.MixtralForCausalLM, "model.layers.0.block_sparse_moe.",
        lambda c: dict(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                       intermediate_size=c.intermediate_size, renormalize=True)),
    "qwen3_moe": Family(
        transformers.Qwen3MoeConfig(**SIZES, moe_intermediate_size=40, num_experts=12, num_experts_per_tok=4,
                                    norm_topk_prob=True),
        transformers.Qwen3MoeForCausalLM, "model.layers.0.mlp.",
        lambda c: dict(num_experts=c.num_experts, top_k=c.num_experts_per_tok,
                       intermediate_size=c.moe_intermediate_size, renormalize=c.norm_topk_prob)),
    "olmoe": Family(
        transformers.OlmoeConfig(**SIZES, intermediate_size=32, num_experts=16, num_experts_per_tok=3),
        transformers.OlmoeForCausalLM, "model.layers.0.mlp.",
        lambda c: dict(num_experts=c.num_experts, top_k=c.num_experts_per_tok,
                       intermediate_size=c.intermediate_size, renormalize=c.norm_topk_prob)),
    "qwen2_moe-shared-expert": Family(
        transformers.Qwen2MoeConfig(**SIZES, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                                    num_experts=6, num_experts_per_tok=2),
        transformers.Qwen2MoeForCausalLM, "model.layers.0.mlp.",
        lambda c: dict(num_experts=c.num_experts, top_k=c.num_experts_per_tok,
                       intermediate_size=c.moe_intermediate_size, renormalize=c.norm_topk_prob,
                       shared_expert_intermediate_size=c.shared_expert_intermediate_size)),
}


@pytest.fixture(scope="module", params=FAMILIES.values(), ids=FAMILIES.keys())
def saved_block(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(family, transformers' MoE block, the block's weights as save_pretrained wrote them, relative names)."""
    family: Family = request.param
    torch.manual_seed(0)
    model = family.model_class(family.config).eval()
    block = model.model.layers[0].mlp
    with torch.no_grad():  # weights that make every output O(1), and routing far from uniform
        for param in block.parameters():
            param.normal_(0, param.shape[-1] ** -0.5)
    path = tmp_path_factory.mktemp("moe")
    model.save_pretrained(path)
    weights = load_file(Path(path) / "model.safetensors")
    block_weights = {name.removeprefix(family.block_prefix): tensor for name, tensor in weights.items()
                     if name.startswith(family.block_prefix)}
    return family, block, block_weights


def _layer(family: Family, backend: str, weights: dict[str, torch.Tensor]) -> FusedMoE:
    layer = FusedMoE(hidden_size=family.config.hidden_size, ops=get_ops(backend), **family.layer_args(family.config))
    loaded = {layer.load_weight(name, tensor)[0] for name, tensor in weights.items()}
    assert loaded == {name for name, _ in layer.named_parameters()}
    return layer


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_moe_layer_matches_transformers_block_on_saved_weights(saved_block, backend: str) -> None:
    family, block, weights = saved_block
    per_expert = [name for name in weights if name.startswith("experts.")]
    assert per_expert and all(name.endswith(".weight") for name in per_expert), "saved as one tensor per expert"
    # With CUDA present Triton compiles for the GPU (else it runs in the interpreter): the layer goes there.
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    layer = _layer(family, backend, weights).to(device)
    hidden = torch.randn(1, 11, family.config.hidden_size)
    with torch.no_grad():
        expected = block(hidden)[0]
        actual = layer(hidden[0].to(device)).cpu()
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)


def test_fused_moe_layer_loads_experts_stacked_as_transformers_holds_them(saved_block) -> None:
    family, block, _ = saved_block
    layer = _layer(family, "torch", block.state_dict())  # experts.gate_up_proj [E, 2I, H], experts.down_proj
    hidden = torch.randn(1, 5, family.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden[0]), block(hidden)[0], atol=2e-5, rtol=2e-5)


def test_fused_moe_layer_in_bfloat16_matches_transformers_within_rounding(saved_block) -> None:
    family, block, weights = saved_block
    layer = _layer(family, "torch", weights).to(torch.bfloat16)
    hidden = torch.randn(1, 9, family.config.hidden_size)
    with torch.no_grad():
        expected = copy.deepcopy(block).to(torch.bfloat16)(hidden.bfloat16())[0]
        actual = layer(hidden[0].bfloat16())
    # Both round each expert's output to bf16; they differ in where the routing weight and the sum are rounded.
    torch.testing.assert_close(actual, expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("renormalize", [False, True])
def test_routing_takes_softmax_top_k_and_renormalizes_when_asked(renormalize: bool) -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    weights, ids = fused_topk(logits, 2, renormalize)
    probs = torch.softmax(logits, dim=-1)[0]
    expected = probs[[1, 2]] / (probs[1] + probs[2] if renormalize else 1.0)
    assert ids.tolist() == [[1, 2]] and weights.dtype == torch.float32
    torch.testing.assert_close(weights[0], expected)


def test_unknown_or_misshapen_weights_are_refused_by_name() -> None:
    layer = FusedMoE(4, 2, 8, 6, True, get_ops("torch"))
    with pytest.raises(ValueError, match="experts.4.w1.weight"):
        layer.load_weight("experts.4.w1.weight", torch.zeros(6, 8))
    with pytest.raises(ValueError, match="experts.0.w2.weight"):
        layer.load_weight("experts.0.w2.weight", torch.zeros(6, 8))
    with pytest.raises(ValueError, match="shared_expert_gate.weight"):
        layer.load_weight("shared_expert_gate.weight", torch.zeros(1, 8))
    with pytest.raises(ValueError, match="top_k"):
        FusedMoE(4, 5, 8, 6, True, get_ops("torch"))
