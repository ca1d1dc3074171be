"""GGUF files of the Qwen2, Qwen3, Gemma 2 and Phi-3 architectures convert as the default model's does, and the
engine then gives transformers' greedy tokens, transformers reading the same file with its own GGUF loader. A
Mixtral file (llama's architecture with experts, which transformers' GGUF loader does not read) converts to the
checkpoint it was written from, and the engine gives that model's greedy tokens.

The files are written here from random transformers models: tensor names from the gguf package's own map
(HF name -> llama.cpp name), with a byte-level BPE tokenizer of 256 bytes, one merge and an end token."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma2Config, MixtralConfig, Phi3Config, Qwen2Config, Qwen3Config

from engine import LLM, SamplingParams
from transformers.convert_slow_tokenizer import bytes_to_unicode

from engine.loader import iter_weights, resolve_model
from tests.reference import hf_generate_greedy

TOKENS = [*bytes_to_unicode().values(), "Ġt", "<|endoftext|>"]
VOCAB = len(TOKENS)
CONFIGS = {
    "qwen2": Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.2),
    "qwen3": Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2),
    # head_dim 256: llama.cpp's query scale for Gemma 2 (not 27B) and transformers' default query_pre_attn_scalar.
    "gemma2": Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=8, max_position_embeddings=256, initializer_range=0.2),
    "phi3": Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       original_max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
                       bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1),
}
MAX_TOKENS = 16


def _write_gguf(model: torch.nn.Module, arch: str, path: Path,
                tensors: dict[str, torch.Tensor] | None = None) -> None:
    """As llama.cpp's convert_hf_to_gguf writes a float32 file of these architectures. tensors: the HF
    checkpoint's (default: the model's parameters); a Mixtral's per-expert ones are stacked as llama.cpp does."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if hasattr(config, "num_local_experts"):
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if arch == "gemma2":
        writer.add_sliding_window(config.sliding_window)
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL] * (VOCAB - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(VOCAB - 1)
    writer.add_eos_token_id(VOCAB - 1)
    writer.add_pad_token_id(0)
    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    tensors = tensors or dict(model.named_parameters())  # a tied lm_head is listed once, as llama.cpp drops it
    experts: dict[str, list[np.ndarray]] = {}
    for name, tensor in tensors.items():
        array = tensor.detach().numpy()
        if arch == "gemma2" and name.endswith("norm.weight"):
            array = array + 1  # llama.cpp stores Gemma's norms as the factor itself
        if arch == "llama" and re.search(r"\.(q|k)_proj\.", name):  # llama.cpp's rotary row order for llama
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            array = array.reshape(heads, 2, -1, array.shape[-1]).swapaxes(1, 2).reshape(array.shape)
        expert = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.\d+\.(w[123])\.weight", name)
        if expert:
            kind = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}[expert[2]]
            experts.setdefault(f"blk.{expert[1]}.{kind}.weight", []).append(array)
            continue
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array)
    for name, arrays in experts.items():  # [experts, out, in], experts in the checkpoint's order
        writer.add_tensor(name, np.stack(arrays))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _random_model(config) -> torch.nn.Module:
    """transformers' random model (seed 0), its norms and biases off their initial ones and zeros, so that no two
    are alike."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn(param.shape))
    return model


def _assert_engine_gives_greedy_tokens_of(reference: torch.nn.Module, path: Path) -> None:
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 20)]
    llm = LLM(model=str(path), device="cpu", dtype="float32", kernel_backend="torch", num_gpu_blocks_override=32)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_generate_greedy(reference, prompt, MAX_TOKENS)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_gguf_converts_to_the_weights_and_tokens_of_transformers_gguf_loader(arch: str, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKMODEL_CACHE", str(tmp_path / "cache"))  # the conversion's cache
    path = tmp_path / f"{arch}.gguf"
    model = _random_model(CONFIGS[arch])
    _write_gguf(model, arch, path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()

    converted = dict(iter_weights(resolve_model(str(path))))
    expected = dict(reference.named_parameters())
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[name], param.detach()) for name, param in expected.items())

    _assert_engine_gives_greedy_tokens_of(reference, path)


def test_a_mixtral_gguf_converts_to_its_checkpoint_and_greedy_tokens(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKMODEL_CACHE", str(tmp_path / "cache"))
    model = _random_model(MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.2))
    model.save_pretrained(tmp_path / "hf")
    checkpoint = load_file(tmp_path / "hf" / "model.safetensors")  # per-expert w1/w2/w3, as Mixtral's are saved
    path = tmp_path / "mixtral.gguf"
    _write_gguf(model, "llama", path, checkpoint)

    converted = dict(iter_weights(resolve_model(str(path))))
    assert set(converted) == set(checkpoint)
    assert all(torch.equal(converted[name], tensor) for name, tensor in checkpoint.items())

    _assert_engine_gives_greedy_tokens_of(model, path)
