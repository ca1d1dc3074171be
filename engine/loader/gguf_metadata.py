"""Reading a GGUF file's metadata into Hugging Face config.json and generation_config.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader

_MISSING = object()
# GGUF architecture -> (architectures, model_type) of config.json. They share llama.cpp's tensor names (qwen2
# adds biases, qwen3 q/k norms, gemma2 two norms, phi3 fused ones; gguf_weights.py); only llama's q/k rows are
# permuted.
HF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                    "qwen3": ("Qwen3ForCausalLM", "qwen3"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
                    "phi3": ("Phi3ForCausalLM", "phi3")}
GEMMA2_27B_LAYERS = 46


def open_gguf(path: Path) -> GGUFReader:
    """A reader over `path`, or a ValueError that says the file is not a usable GGUF."""
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ValueError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e}); "
                         f"the file may be truncated or corrupt") from e
    architecture = field(reader, "general.architecture")
    if architecture not in HF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {architecture!r} is not supported "
                         f"(supported: {', '.join(HF_ARCHITECTURES)})")
    return reader


def field(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """A metadata value as a Python value; a missing key without a default is a corrupt file."""
    f = reader.get_field(key)
    if f is None:
        if default is _MISSING:
            raise ValueError(f"GGUF metadata lacks the required key {key!r}")
        return default
    return f.contents()


def hf_config(reader: GGUFReader) -> dict[str, Any]:
    """config.json of the file's architecture, with the values transformers' own GGUF loader derives."""
    arch = field(reader, "general.architecture")
    num_heads = field(reader, f"{arch}.attention.head_count")
    hidden_size = field(reader, f"{arch}.embedding_length")
    tensor_names = {t.name for t in reader.tensors}
    architecture, model_type = HF_ARCHITECTURES[arch]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(reader, f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": field(reader, f"{arch}.attention.head_count_kv", num_heads),
        "head_dim": field(reader, f"{arch}.attention.key_length", hidden_size // num_heads),
        "hidden_act": "silu",
        # float32 in the file: keep the value it rounds to, as transformers does.
        "rms_norm_eps": float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": field(reader, f"{arch}.context_length"),
        "vocab_size": field(reader, f"{arch}.vocab_size", None) or len(field(reader, "tokenizer.ggml.tokens")),
        # llama.cpp drops output.weight when the head shares the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "padding"):
        token_id = field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            config[f"{key.replace('padding', 'pad')}_token_id"] = token_id
    num_experts = field(reader, f"{arch}.expert_count", None)
    if arch == "llama" and num_experts:  # Mixtral: llama's tensors, with a mixture of experts for the MLP
        config |= {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": num_experts,
                   "num_experts_per_tok": field(reader, "llama.expert_used_count")}
    if arch == "gemma2":
        config |= gemma2_config(reader, config)
    if arch == "phi3":
        config |= phi3_config(reader, config)
    return config


def gemma2_config(reader: GGUFReader, config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2's own keys. GGUF does not record query_pre_attn_scalar: llama.cpp scales queries by
    hidden_size / heads for the 27B model (46 layers) and by head_dim otherwise, and so does this."""
    scalar = (config["hidden_size"] // config["num_attention_heads"]
              if config["num_hidden_layers"] == GEMMA2_27B_LAYERS else config["head_dim"])
    return {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
            "sliding_window": field(reader, "gemma2.attention.sliding_window"),
            "attn_logit_softcapping": float(field(reader, "gemma2.attn_logit_softcapping")),
            "final_logit_softcapping": float(field(reader, "gemma2.final_logit_softcapping"))}


def phi3_config(reader: GGUFReader, config: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's own keys: the rotated part of each head (Phi-4-mini rotates 3/4) and the window."""
    rotary_dim = field(reader, "phi3.rope.dimension_count", config["head_dim"])
    return {"partial_rotary_factor": rotary_dim / config["head_dim"],
            "sliding_window": field(reader, "phi3.attention.sliding_window", None)}


def hf_generation_config(reader: GGUFReader) -> dict[str, Any]:
    """generation_config.json: every end-of-generation id the GGUF declares (eos, end of turn, end of message)."""
    eos = [field(reader, f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot", "eom")]
    eos = sorted({i for i in eos if i is not None})
    generation = {"bos_token_id": field(reader, "tokenizer.ggml.bos_token_id", None),
                  "eos_token_id": eos[0] if len(eos) == 1 else eos}
    return {k: v for k, v in generation.items() if v not in (None, [])}


def chat_template(reader: GGUFReader) -> str | None:
    return field(reader, "tokenizer.chat_template", None)
