"""Checkpoint tensors reach the engine's parameters by name: stacked layers by their part's name, whatever
the shapes, and a checkpoint with a missing or unknown tensor is refused, naming it."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from engine.models import get_model_class
from kernels import get_ops

# q, k and v of one size (MHA), gate and up too: shapes cannot tell the parts apart, only names can.
CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=16, architectures=["LlamaForCausalLM"])


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIG).state_dict()


def _model() -> torch.nn.Module:
    return get_model_class(CONFIG.architectures)(CONFIG, get_ops("torch"))


def test_stacked_parts_land_in_their_rows_by_name(checkpoint: dict[str, torch.Tensor]) -> None:
    model = _model()
    model.load_weights(checkpoint.items())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    prefix = "model.layers.0."
    assert torch.equal(attn.qkv_proj.weight, torch.cat([checkpoint[f"{prefix}self_attn.{p}_proj.weight"]
                                                        for p in "qkv"]))
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([checkpoint[f"{prefix}mlp.{p}_proj.weight"]
                                                           for p in ("gate", "up")]))


def test_a_checkpoint_lacking_a_part_is_refused(checkpoint: dict[str, torch.Tensor]) -> None:
    partial = {k: v for k, v in checkpoint.items() if ".k_proj." not in k}
    with pytest.raises(ValueError, match="lacks weights.*qkv_proj"):
        _model().load_weights(partial.items())


def test_a_checkpoint_with_an_unknown_tensor_is_refused(checkpoint: dict[str, torch.Tensor]) -> None:
    extra = checkpoint | {"model.layers.0.mlp.experts.0.w1.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.mlp.experts.0.w1.weight'"):
        _model().load_weights(extra.items())
