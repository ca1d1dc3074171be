"""GGUF file → cached Hugging Face directory, converted once."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from engine.loader.cache import atomic_path, cache_root
from engine.loader.hf import save_weights


def converted_gguf(gguf: Path, key: str | None = None) -> Path:
    """The cached HF directory of `gguf`, converting it on first use.

    `key` names the cache entry; by default it is derived from the file's name, size and mtime,
    which is cheap where hashing a multi-GB file on every start would not be.
    """
    gguf = gguf.resolve()
    final = cache_root() / "converted" / (key or file_key(gguf))
    if final.is_dir():
        return final
    print(f"tokmodel: converting {gguf.name} to a Hugging Face directory (once) in {final}", file=sys.stderr)
    with atomic_path(final, is_dir=True) as scratch:
        convert_gguf(gguf, scratch)
    return final


def file_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:16]}"


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write config.json, generation_config.json, tokenizer files and float32 safetensors to `out_dir`."""
    # Imported here, not at the top: only a GGUF needs the gguf package, and a machine serving Hugging Face
    # directories may lack it (the GPU check runs with no gguf installed).
    from engine.loader.gguf_metadata import chat_template, hf_config, hf_generation_config, open_gguf
    from engine.loader.gguf_weights import hf_tensors

    reader = open_gguf(gguf)
    config = hf_config(reader)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(hf_generation_config(reader), indent=2))
    save_tokenizer(gguf, chat_template(reader), out_dir)
    save_weights(hf_tensors(reader, config), out_dir)


def save_tokenizer(gguf: Path, template: str | None, out_dir: Path) -> None:
    """transformers' fast tokenizer built from the GGUF vocabulary, saved with the file's chat template."""
    from transformers import AutoTokenizer

    print("tokmodel: building the tokenizer from the GGUF vocabulary", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
