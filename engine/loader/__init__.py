"""Turning a model argument into a local Hugging Face directory, and reading what it holds.

`resolve_model` accepts None (the default model), a .gguf file or a directory holding one, a
Hugging Face directory (or its config.json), or a hub id; every other module sees only the
resulting directory.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from engine.loader.cache import atomic_path, cache_root
from engine.loader.default_model import DEFAULT_MODEL_NAME, GGUF_SHA256, default_model_gguf
from engine.loader.gguf_convert import converted_gguf
from engine.loader.hf import download_hub_model, iter_weight_slices, iter_weights
from engine.loader.tokenizer import end_token_ids, load_tokenizer

__all__ = ["resolve_model", "default_model_gguf", "iter_weights", "iter_weight_slices", "load_tokenizer", "end_token_ids"]


def resolve_model(model: str | None, load_format: str = "auto") -> Path:
    """A local HF directory (config.json, *.safetensors, tokenizer files) for `model`.

    With load_format="dummy" only config.json is required, since the weights will be random.
    """
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path)
    if path.is_file() and path.suffix == ".json":
        path = config_file_dir(path)
    if path.is_dir():
        return _local_dir(path, load_format)
    if path.is_absolute() or model.startswith((".", "~")) or path.suffix in (".gguf", ".json"):
        raise ValueError(f"model={model!r}: no such file or directory")
    return download_hub_model(model, with_weights=load_format != "dummy")


def default_model_dir() -> Path:
    """The converted default model; keyed by its known sha256 so a warm start hashes nothing."""
    return converted_gguf(default_model_gguf(), key=f"{DEFAULT_MODEL_NAME}-{GGUF_SHA256[:16]}")


def config_file_dir(path: Path) -> Path:
    """A directory whose config.json is `path`: its own for a config.json, else a cached copy, so
    that named shape files (bench/configs/llama-3-8b.json) load like any HF directory."""
    if path.name == "config.json":
        return path.parent
    data = path.read_bytes()
    final = cache_root() / "configs" / f"{path.stem}-{hashlib.sha256(data).hexdigest()[:16]}"
    if not final.is_dir():
        with atomic_path(final, is_dir=True) as scratch:
            (scratch / "config.json").write_bytes(data)
    return final


def _local_dir(path: Path, load_format: str) -> Path:
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return converted_gguf(ggufs[0])
        found = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
        raise ValueError(f"model={str(path)!r} has no config.json and {found}; expected a Hugging Face "
                         f"directory or exactly one .gguf")
    if load_format != "dummy" and not any(path.glob("*.safetensors")):
        raise ValueError(f"model={str(path)!r} has no *.safetensors weights (other formats are not "
                         f"supported); use load_format='dummy' for random weights")
    return path
