"""Hugging Face model directories: their weights on disk, and fetching one from the hub."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# What the engine reads from a hub repo: never .bin/.pt/.gguf duplicates of the same weights.
HUB_METADATA_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                         "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"]
HUB_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
SHARD_BYTES = 4 << 30


def iter_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, tensor) over every *.safetensors file in `model_dir`, one tensor at a time."""
    for name, lazy in iter_weight_slices(model_dir):
        yield name, lazy[:]


def iter_weight_slices(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(HF parameter name, safetensors slice): indexing a slice reads only those rows or columns from disk,
    so a tensor-parallel rank reads only its shard. A slice is valid until the next one is taken."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors weights")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def save_weights(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write model.safetensors, or HF-style shards plus their index once the total passes `shard_bytes`.

    Each shard is written as it fills, so a large model never sits in memory whole.
    """
    shards = [list(shard) for shard in _write_shards(tensors, out_dir, shard_bytes)]
    if len(shards) == 1:
        os.rename(out_dir / _scratch_name(0), out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(out_dir / _scratch_name(i), out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    total = sum(f.stat().st_size for f in out_dir.glob("model-*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path,
                  shard_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = count = 0
    for name, tensor in tensors:
        if shard and size + tensor.nbytes > shard_bytes:
            save_file(shard, out_dir / _scratch_name(count), metadata={"format": "pt"})
            yield shard
            shard, size, count = {}, 0, count + 1
        shard[name] = tensor
        size += tensor.nbytes
    save_file(shard, out_dir / _scratch_name(count), metadata={"format": "pt"})
    yield shard


def _scratch_name(index: int) -> str:
    return f"shard-{index}.safetensors.tmp"


def download_hub_model(repo_id: str, with_weights: bool) -> Path:
    """snapshot_download the files the engine reads; a ValueError says why when that is impossible."""
    from huggingface_hub import snapshot_download

    patterns = HUB_METADATA_PATTERNS + (HUB_WEIGHT_PATTERNS if with_weights else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError) as e:
        raise ValueError(f"model={repo_id!r} is neither a local path nor a model the Hugging Face hub "
                         f"could provide ({type(e).__name__}: {str(e).splitlines()[0]}); pass a local HF "
                         f"directory or .gguf file, or leave model unset for the default model") from e
