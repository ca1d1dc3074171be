"""Each supported model family, as a Hugging Face directory of random weights (no model hub), gives the same
greedy tokens in TokModel's engine as in transformers' own model, on both kernel backends.

On the CPU the models are tiny and fp32 (the Triton kernels run in the interpreter). With CUDA the same tests run
wider models (head_dim 128, a context long enough for decode to split) on the GPU: `benchmarks/gpu_check.py`
runs this module there. bf16 cannot be compared token for token (a near-tie of two logits flips with rounding),
so in bf16 each greedy token must be transformers' fp32 argmax or within a rounding error of it.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from benchmarks.random_model import save_random_model
from engine import LLM, SamplingParams
from tests.reference import hf_greedy, hf_logprobs

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
REPO = Path(__file__).resolve().parents[1]


class Sizes(NamedTuple):
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    prompt_lens: tuple[int, ...]
    max_tokens: int


# On a GPU one prompt is longer than MIN_SPLIT_TOKENS, so that decode also takes its split path.
SIZES = Sizes(256, 4, 2, 128, 4, 2048, (5, 17, 300), 24) if HAS_CUDA else Sizes(64, 4, 2, 16, 2, 512, (5, 17, 40), 8)
# Mistral's window is shorter than the longest sequence, so that it masks something.
WINDOW = SIZES.prompt_lens[-1] // 2


def _family_configs() -> dict[str, PretrainedConfig]:
    common = dict(vocab_size=SIZES.vocab, hidden_size=SIZES.hidden, intermediate_size=2 * SIZES.hidden,
                  num_hidden_layers=SIZES.layers, num_attention_heads=SIZES.num_heads,
                  num_key_value_heads=SIZES.num_kv_heads, head_dim=SIZES.head_dim, max_position_embeddings=1024)
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return {
        "llama": LlamaConfig(**common, rope_scaling=llama3_rope),
        "qwen2": Qwen2Config(**common),  # biases on q, k and v
        "qwen3": Qwen3Config(**common, tie_word_embeddings=True),  # RMSNorm on q and k per head
        "mistral": MistralConfig(**common, sliding_window=WINDOW),
    }


FAMILIES = _family_configs()


class Family(NamedTuple):
    model_dir: Path
    reference: torch.nn.Module  # transformers' model in fp32, on the same weights


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    model_dir = save_random_model(FAMILIES[request.param], tmp_path_factory.mktemp(request.param))
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    return Family(model_dir, reference)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, SIZES.vocab, (n,), generator=generator).tolist() for n in SIZES.prompt_lens]


def _hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.device(DEVICE):  # hf_greedy builds its input on the default device
        return hf_greedy(model, prompt, SIZES.max_tokens)


def _engine_greedy(model_dir: Path, prompts: list[list[int]], dtype: str, backend: str) -> list[list[int]]:
    """All prompts in one batch (prefills beside decodes), greedy, EOS ignored."""
    llm = LLM(model=str(model_dir), device=DEVICE, dtype=dtype, kernel_backend=backend, num_gpu_blocks_override=128)
    params = SamplingParams(temperature=0, max_tokens=SIZES.max_tokens, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm  # on a GPU the next engine's cache must not find this one's still allocated
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()
    return tokens


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_tokens_match_transformers_in_fp32(family: Family, prompts: list[list[int]], backend: str) -> None:
    actual = _engine_greedy(family.model_dir, prompts, "float32", backend)
    for prompt, tokens in zip(prompts, actual):
        expected = _hf_greedy(family.reference, prompt)
        assert tokens == expected, _first_divergence(family.reference, prompt, tokens, expected)


def _first_divergence(model: torch.nn.Module, prompt: list[int], tokens: list[int], expected: list[int]) -> str:
    """Where the outputs part, and how close transformers' two best tokens were there: a gap near fp32's
    rounding (~1e-6) is a near-tie that summation order may flip; a larger one is a bug."""
    at = next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)
    with torch.device(DEVICE):
        logprobs = hf_logprobs(model, prompt, expected[:at + 1])[at]
    gap = float(logprobs[expected[at]] - logprobs[tokens[at]])
    return f"prompt of {len(prompt)} tokens: output token {at} is {tokens[at]}, transformers' {expected[at]}, {gap:.2e} more likely"


# Random weights give nearly flat distributions: the two best tokens are typically 0.04 apart in log-probability,
# and bf16 moves a log-probability by ~0.002 here. A near-tie closer than the tolerance may flip; a real error
# (a wrong token) falls short by far more.
BF16_LOGPROB_TOLERANCE = 0.01


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_CUDA, reason="the interpreter truncates bf16 "
                                                    "instead of rounding it: GPUs only")),
])
def test_bf16_greedy_tokens_are_transformers_fp32_argmax_within_rounding(family: Family, prompts: list[list[int]],
                                                                        backend: str) -> None:
    for prompt, tokens in zip(prompts, _engine_greedy(family.model_dir, prompts, "bfloat16", backend)):
        with torch.device(DEVICE):
            logprobs = torch.stack(hf_logprobs(family.reference, prompt, tokens))
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0]
        shortfall = logprobs.max(dim=1).values - chosen
        assert shortfall.max() <= BF16_LOGPROB_TOLERANCE, f"shortfall per token: {shortfall.tolist()}"


def test_engine_imports_and_loads_a_hf_directory_without_the_gguf_package(tmp_path: Path,
                                                                           prompts: list[list[int]]) -> None:
    model_dir = save_random_model(FAMILIES["llama"], tmp_path)
    # A fresh interpreter in which `import gguf` fails, as on a GPU machine with only the serving dependencies.
    script = f"""
import sys
class NoGguf:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gguf":
            raise ImportError("gguf is hidden by the test")
sys.meta_path.insert(0, NoGguf())
from engine import LLM, SamplingParams
llm = LLM(model={str(model_dir)!r}, device="cpu", dtype="float32", num_gpu_blocks_override=16)
out = llm.generate([{prompts[0]!r}], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
print(len(out[0].outputs[0].token_ids))
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "2"
