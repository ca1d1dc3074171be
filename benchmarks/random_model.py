"""Hugging Face model directories with random weights, built from a config: models to test and measure on a
machine with no network (no model hub, no default model), loaded by TokModel and by transformers alike.

    save_random_model(config, out_dir)           config.json + model.safetensors (transformers' own init)
    save_stand_in_tokenizer(out_dir, vocab_size)  a tokenizer and chat template for the server's endpoints
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# A chat template in the ChatML style: enough for /v1/chat/completions to build a prompt.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_random_model(config: PretrainedConfig, out_dir: Path, dtype: torch.dtype = torch.float32,
                      device: str = "cpu", seed: int = 0) -> Path:
    """transformers' random initialisation of `config` (normal, std initializer_range), saved as safetensors.
    Built on `device`: initialising a 0.6B model takes seconds on a CPU, milliseconds on a GPU."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def save_stand_in_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A tokenizer covering every id of the model: printable ASCII characters one token each (so different
    prompts get different ids), every other id a word "<tN>". A random-weight model samples any id, and the
    server must be able to detokenize each one; a real tokenizer would need the model hub."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(characters)} | {f"<t{i}>": i for i in range(len(characters), vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=" ",
                            chat_template=CHAT_TEMPLATE).save_pretrained(out_dir)


def random_model_dir(config_file: Path, out_dir: Path, overrides: dict | None = None, dtype: torch.dtype = torch.bfloat16,
                     with_tokenizer: bool = False) -> Path:
    """`out_dir` holding random weights of the config in `config_file` (with `overrides`, e.g. smaller sizes);
    built on first use, on the GPU when there is one, and reused after."""
    if (out_dir / "config.json").exists():
        return out_dir
    values = json.loads(Path(config_file).read_text()) | (overrides or {})
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    scratch = out_dir.with_name(out_dir.name + ".partial")  # a killed build leaves no half directory behind
    save_random_model(config, scratch, dtype, "cuda" if torch.cuda.is_available() else "cpu")
    if with_tokenizer:
        save_stand_in_tokenizer(scratch, config.vocab_size)
    scratch.rename(out_dir)
    return out_dir
