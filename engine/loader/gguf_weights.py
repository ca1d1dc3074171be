"""GGUF tensors as Hugging Face parameters (Llama, Mixtral, Qwen2, Qwen3, Gemma 2, Phi-3): dequantized, renamed,
Llama's Q/K rows restored, Gemma's norms taken back from llama.cpp's 1 + weight, Mixtral's stacked experts split
into the per-expert tensors of its checkpoints."""
from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
# Where a family's names differ: Gemma 2's four norms per layer (its ffn_norm is the one before the MLP, not the
# one after attention); Phi-3's fused q/k/v, and its ffn_up holding gate and up.
_FAMILY_LAYER_NAMES = {
    "gemma2": _LAYER_NAMES | {"post_attention_norm": "post_attention_layernorm",
                              "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": _LAYER_NAMES | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "mixtral": _LAYER_NAMES | {"ffn_gate_inp": "block_sparse_moe.gate"},
}
# llama.cpp stacks each projection of all experts in one tensor [experts, out, in]; Mixtral's checkpoints hold
# one per expert: block_sparse_moe.experts.{e}.w1 (gate), w3 (up), w2 (down).
_STACKED_EXPERTS = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
_PERMUTED_Q_K = ("llama", "mixtral")  # llama.cpp permutes the rotary rows of llama's q and k alone
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)")


def hf_name(gguf_name: str, model_type: str) -> str:
    """The HF parameter name of a llama.cpp tensor name (a weight, or a bias: Qwen2's q/k/v)."""
    layer_names = _FAMILY_LAYER_NAMES.get(model_type, _LAYER_NAMES)
    base, _, kind = gguf_name.rpartition(".")
    if kind in ("weight", "bias"):
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{kind}"
        match = _LAYER_TENSOR.fullmatch(base)
        if match and match.group(2) in layer_names:
            return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}.{kind}"
    # rope_freqs (Llama 3.1 scaling) and rope_factors_long/short (Phi-3's longrope) land here too: HF needs
    # them as config.rope_scaling, which GGUF does not record, so loading without them would change the model.
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent")


def hf_tensors(reader: GGUFReader, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the file as (HF name, float32 tensor), with a progress bar on stderr."""
    for tensor in tqdm(reader.tensors, desc="converting GGUF tensors", unit="tensor", file=sys.stderr):
        # dequantize() gives numpy order (GGUF dims reversed), which is HF's [out, in].
        weights = dequantize(tensor.data, tensor.tensor_type)
        stacked = _LAYER_TENSOR.fullmatch(tensor.name.removesuffix(".weight"))
        if stacked and stacked.group(2) in _STACKED_EXPERTS:
            prefix = f"model.layers.{stacked.group(1)}.block_sparse_moe.experts"
            for expert, rows in enumerate(weights):
                name = f"{prefix}.{expert}.{_STACKED_EXPERTS[stacked.group(2)]}.weight"
                yield name, torch.from_numpy(np.array(rows, dtype=np.float32))
            continue
        name = hf_name(tensor.name, config["model_type"])
        if config["model_type"] in _PERMUTED_Q_K and ".q_proj." in name:
            weights = unpermute_rows(weights, config["num_attention_heads"])
        elif config["model_type"] in _PERMUTED_Q_K and ".k_proj." in name:
            weights = unpermute_rows(weights, config["num_key_value_heads"])
        elif config["model_type"] == "gemma2" and name.endswith("norm.weight"):  # llama.cpp stores 1 + weight
            weights = weights - 1
        # np.array copies: F32 tensors come back as views of the read-only file mapping.
        yield name, torch.from_numpy(np.array(weights, dtype=np.float32))


def unpermute_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's `permute`, which interleaves each head's two rotary halves.

    llama.cpp stores rows as reshape(heads, 2, d/2).swapaxes(1, 2) for its rotary layout;
    swapping the same axes of reshape(heads, d/2, 2) restores HF's order (as transformers does).
    """
    head_pairs = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, head_pairs, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
