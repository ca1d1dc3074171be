"""A model directory's tokenizer and every token id that ends a generation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# End-of-turn markers of the common chat templates (ChatML, Llama 3, Phi, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def load_tokenizer(model_dir: Path) -> Any | None:
    """transformers' AutoTokenizer for `model_dir`, or None when it ships no tokenizer files."""
    if not any((Path(model_dir) / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def end_token_ids(model_dir: Path, tokenizer: Any | None) -> set[int]:
    """Every end token the model declares: config and generation_config eos ids, the tokenizer's
    eos, and the chat template's end-of-turn token (instruct models stop on it, not on eos)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        ids |= _as_ids(_read_json(Path(model_dir) / name).get("eos_token_id"))
    if tokenizer is None:
        return ids
    ids |= _as_ids(tokenizer.eos_token_id)
    template = tokenizer.chat_template or ""
    if not isinstance(template, str):  # a named set of templates
        template = " ".join(template.values() if isinstance(template, dict) else map(str, template))
    vocab = tokenizer.get_vocab()
    ids |= {vocab[token] for token in END_OF_TURN_TOKENS if token in template and token in vocab}
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _as_ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)
