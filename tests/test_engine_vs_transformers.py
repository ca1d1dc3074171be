"""Greedy outputs of the engine are token-identical to transformers on the same weights, however the
scheduler slices the work: staggered arrivals, small prefill chunks, prefix-cache hits, preemption."""
from __future__ import annotations

import pytest

from engine import EngineConfig, SamplingParams
from engine.engine_core import EngineCore
from tests.reference import hf_greedy

MAX_TOKENS = 12
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "In a distant galaxy, far beyond the reach of any telescope, there lived a small robot who " * 4,
    "Q: What is the boiling point of water at sea level?\nA:",
    "def fibonacci(n):\n    ",
    "Once upon a time",
    "In a distant galaxy, far beyond the reach of any telescope, there lived a small robot who " * 4 + "dreamed",
]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(hf_model, prompt_ids):
    return [hf_greedy(hf_model, ids, MAX_TOKENS) for ids in prompt_ids]


def make_engine(**overrides) -> EngineCore:
    return EngineCore(EngineConfig(device="cpu", dtype="float32", kernel_backend="torch", **overrides))


def run_staggered(engine: EngineCore, prompt_ids: list[list[int]]) -> dict[str, list[int]]:
    """Requests arrive in three waves, at different steps, while earlier ones are mid-generation."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    waves = [prompt_ids[:2], prompt_ids[2:5], prompt_ids[5:]]
    results: dict[str, list[int]] = {}
    next_id = 0
    for wave in waves:
        for ids in wave:
            engine.add_request(str(next_id), ids, params)
            next_id += 1
        for _ in range(3):
            results.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    while engine.has_unfinished_requests():
        results.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return results


def assert_matches(results: dict[str, list[int]], expected: list[list[int]]) -> None:
    for i, tokens in enumerate(expected):
        assert results[str(i)] == tokens, f"prompt {i}: {PROMPTS[i][:40]!r}"


def test_greedy_tokens_match_transformers_with_staggered_arrivals(prompt_ids, expected):
    engine = make_engine()
    assert_matches(run_staggered(engine, prompt_ids), expected)
    engine.kv_cache_manager.pool.check_integrity()


def test_greedy_tokens_match_with_small_prefill_chunks(prompt_ids, expected):
    engine = make_engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    assert_matches(run_staggered(engine, prompt_ids), expected)


def test_greedy_tokens_match_with_prefix_cache_hits(prompt_ids, expected):
    engine = make_engine()
    run_staggered(engine, prompt_ids)
    hits_before = engine.kv_cache_manager.prefix_cache_hits
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine.add_request("again", prompt_ids[8], params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    (out,) = outputs
    assert out.num_cached_tokens >= 16 * (len(prompt_ids[8]) // 16 - 1)
    assert engine.kv_cache_manager.prefix_cache_hits > hits_before
    assert out.outputs[0].token_ids == expected[8]


def test_preempted_requests_resume_with_identical_tokens(prompt_ids, expected):
    # Room for about two sequences at a time: the scheduler must preempt and recompute.
    longest = max(len(p) for p in prompt_ids) + MAX_TOKENS
    engine = make_engine(block_size=16, num_gpu_blocks_override=2 * (-(-longest // 16)) + 1)
    assert_matches(run_staggered(engine, prompt_ids), expected)
    assert engine.scheduler.num_preemptions > 0
    engine.kv_cache_manager.pool.check_integrity()
    assert engine.kv_cache_manager.usage == 0


def test_llm_generate_with_one_bad_prompt_leaves_nothing_behind():
    from engine import LLM
    llm = LLM(device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache_manager.usage == 0
