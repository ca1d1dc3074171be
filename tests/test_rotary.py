"""Each rope variant's cos/sin table (engine/layers/rotary.py) against transformers' own frequencies and
attention factors (ROPE_INIT_FUNCTIONS), position by position. The model-level tests (test_model_families.py)
run the same variants end to end."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Phi3Config, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.layers.rotary import cos_sin_cache, rope_parameters

HEAD_DIM = 64
MAX_POSITION = 4096
ORIGINAL = 1024  # a pretraining context shorter than the served one, as the scaled variants have

SCALED_ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                    "beta_fast": 16, "beta_slow": 2, "original_max_position_embeddings": ORIGINAL},
}


def _table(inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor) -> torch.Tensor:
    freqs = torch.outer(positions.float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor


def _llama_config(rope: dict) -> PretrainedConfig:
    return LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=MAX_POSITION,
                       rope_parameters={"rope_theta": 500000.0} | rope)


@pytest.mark.parametrize("name", list(SCALED_ROPES))
def test_scaled_rope_table_matches_transformers(name: str) -> None:
    config = _llama_config(SCALED_ROPES[name])
    # Transformers' frequencies for the longest sequence the engine serves (dynamic NTK depends on it).
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu",
                                                                                         seq_len=MAX_POSITION)
    expected = _table(inv_freq, attention_factor, torch.arange(MAX_POSITION))
    torch.testing.assert_close(cos_sin_cache(rope_parameters(config), HEAD_DIM, MAX_POSITION), expected)


def test_longrope_table_takes_short_factors_inside_the_original_context_and_long_ones_past_it() -> None:
    rotary_dim = HEAD_DIM // 2  # with Phi-4-mini's kind of partial rotary factor
    generator = torch.Generator().manual_seed(0)
    short_factor, long_factor = (offset + torch.rand(rotary_dim // 2, generator=generator) for offset in (1, 3))
    config = Phi3Config(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=MAX_POSITION,
                        original_max_position_embeddings=ORIGINAL,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                         "original_max_position_embeddings": ORIGINAL,
                                         "short_factor": short_factor.tolist(), "long_factor": long_factor.tolist()})
    table = cos_sin_cache(rope_parameters(config), HEAD_DIM, MAX_POSITION)
    assert table.shape == (MAX_POSITION, rotary_dim)
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=ORIGINAL)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=ORIGINAL + 1)
    assert factor > 1  # the attention factor of a 4x longer context
    torch.testing.assert_close(table[:ORIGINAL], _table(short, factor, torch.arange(ORIGINAL)))
    torch.testing.assert_close(table[ORIGINAL:], _table(long, factor, torch.arange(ORIGINAL, MAX_POSITION)))


def test_unknown_rope_type_is_refused_by_name() -> None:
    params = {"rope_type": "made-up", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    with pytest.raises(ValueError, match="made-up"):
        cos_sin_cache(params, HEAD_DIM, MAX_POSITION)
