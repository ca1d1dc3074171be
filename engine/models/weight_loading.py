"""Checkpoint weights into a model's parameters, by name: never by shape.

A model names its stacked parameters as vLLM's `stacked_params_mapping`: (our parameter, checkpoint part,
shard id). A checkpoint tensor whose name holds the part (".q_proj.") goes to that shard of the stacked
layer; a tensor inside a block that loads its own (`FusedMoE.load_weight`: experts per expert or stacked) goes
to that block, whole; every other tensor must match a parameter's name. A layer with a `weight_loader` (the
parallel layers of engine/layers/) copies its own slice of the tensor; any other parameter must match the
tensor's shape exactly.
A checkpoint that lacks a parameter, or a part of one, or holds a tensor the model has no place for, is refused.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from torch import nn

from engine.layers.sharded_weights import Loaded, copy_weight

StackedParams = list[tuple[str, str, str | int]]

# transformers' precomputed rotary frequencies, saved by some older checkpoints: the engine computes its own.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, Loaded]], stacked_params: StackedParams,
                 tied_lm_head: bool, renames: dict[str, str] | None = None) -> None:
    """renames: checkpoint module names to ours (Mixtral's ".block_sparse_moe." is our ".mlp.")."""
    params = dict(model.named_parameters())  # a tied lm_head is the embedding's parameter, listed once
    blocks = {f"{prefix}.": module for prefix, module in model.named_modules() if hasattr(module, "load_weight")}
    loaded: dict[str, set] = defaultdict(set)
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES) or (tied_lm_head and name == "lm_head.weight"):
            continue
        for old, new in (renames or {}).items():
            name = name.replace(old, new)
        block = next((prefix for prefix in blocks if name.startswith(prefix)), None)
        if block is not None:
            param, shard = blocks[block].load_weight(name[len(block):], tensor[:])  # experts are not sharded
            loaded[block + param].add(shard)
            continue
        for fused, part, shard_id in stacked_params:
            if f".{part}." in name:
                name = name.replace(f".{part}.", f".{fused}.")
                _owner(model, name).weight_loader(_param(params, name), tensor, shard_id)
                loaded[name].add(shard_id)
                break
        else:
            param, owner = _param(params, name), _owner(model, name)
            if hasattr(owner, "weight_loader"):
                owner.weight_loader(param, tensor, None)
            else:
                copy_weight(param, tensor, name)
            loaded[name].add(None)
    missing = [name for name in params if not _complete(model, name, loaded[name])]
    if missing:
        raise ValueError(f"checkpoint lacks weights: {missing[:5]}")


def _param(params: dict[str, nn.Parameter], name: str) -> nn.Parameter:
    if name not in params:
        raise ValueError(f"checkpoint has unexpected weight {name!r}")
    return params[name]


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


def _complete(model: nn.Module, name: str, shards: set[str | int | None]) -> bool:
    """Loaded whole, or every part of a stacked layer (or of a block's stacked parameter) loaded."""
    if None in shards:
        return True
    layer = _owner(model, name)
    if hasattr(layer, "expected_shards"):
        return bool(shards) and shards == layer.expected_shards(name.rpartition(".")[2])
    parts = getattr(layer, "parts", None)
    return bool(shards) and parts is not None and shards == set(parts)
