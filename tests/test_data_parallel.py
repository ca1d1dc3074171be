"""Data parallelism: two engine replicas, each its own process, behind one server. Concurrent requests spread over
both, /metrics reports each replica under its engine label and the counts add up to what the responses say, and
requests that share a prompt prefix go to the replica that holds it, even when the other one is idle."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from engine import EngineConfig
from engine.data_parallel import DPAsyncLLM, PrefixAffinityRouter
from engine.loader.tokenizer import TOKENIZER_FILES
from server.app import ServerOptions
from server_fixtures import serving_in_process

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def tiny_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small random Llama with the default model's tokenizer, so the server takes text."""
    out = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return str(out)


async def _complete(session, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    async with session.post("/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _per_engine(session, name: str) -> dict[str, float]:
    async with session.get("/metrics") as response:
        text = await response.text()
    values = {}
    for line in text.splitlines():
        if line.startswith(f"tokmodel:{name}{{"):
            engine = line.split('engine="')[1].split('"')[0]
            values[engine] = float(line.rsplit(" ", 1)[1])
    return values


def test_two_replicas_share_the_load_report_their_metrics_and_keep_prefixes_together(tiny_model: str) -> None:
    llm = DPAsyncLLM(EngineConfig(model=tiny_model, dtype="float32", data_parallel_size=2, block_size=BLOCK_SIZE))
    shared = list(range(1000, 1000 + 2 * BLOCK_SIZE))  # two full blocks

    async def scenario() -> None:
        async with serving_in_process(llm, ServerOptions()) as server:
            session = server.session
            # Distinct prompts, all at once: the least-loaded rule spreads them.
            distinct = [[2000 + 100 * i + j for j in range(BLOCK_SIZE + 3)] for i in range(6)]
            results = await asyncio.gather(*(_complete(session, p, 8) for p in distinct))
            generated = await _per_engine(session, "generation_tokens_total")
            assert set(generated) == {"0", "1"} and all(v > 0 for v in generated.values()), generated
            assert sum(generated.values()) == sum(r["usage"]["completion_tokens"] for r in results)
            prompt_tokens = await _per_engine(session, "prompt_tokens_total")
            assert sum(prompt_tokens.values()) == sum(r["usage"]["prompt_tokens"] for r in results)

            # The first shared-prefix request caches the prefix on some replica; a long unrelated request then
            # ties the loads, and the next two shared-prefix requests still go where their prefix is.
            await _complete(session, shared + [7], 1)
            hits_before = await _per_engine(session, "prefix_cache_hits_total")
            busy = asyncio.ensure_future(_complete(session, [3000 + j for j in range(BLOCK_SIZE + 1)], 400))
            while llm.get_stats().num_running_reqs < 1:
                await asyncio.sleep(0.02)
            await asyncio.gather(_complete(session, shared + [8, 9], 4), _complete(session, shared + [10], 4))
            hits = await _per_engine(session, "prefix_cache_hits_total")
            gained = {engine: hits[engine] - hits_before[engine] for engine in hits}
            assert sorted(gained.values()) == [0, 2 * len(shared)], gained
            busy.cancel()  # its client goes away: the request is aborted

    try:
        asyncio.run(scenario())
    finally:
        llm.shutdown()


def test_router_prefers_the_least_loaded_replica_within_the_affinity_slack() -> None:
    router = PrefixAffinityRouter(2, BLOCK_SIZE)
    prompt = list(range(3 * BLOCK_SIZE))
    assert router.route(prompt, [(3, 0.0), (1, 0.0)]) == 1  # least loaded first
    assert router.route(prompt[:2 * BLOCK_SIZE] + [5], [(0, 0.0), (4, 0.0)]) == 1  # its prefix is there
    assert router.route(prompt, [(0, 0.0), (10, 0.0)]) == 0  # too far beyond the least loaded
    assert router.route([1, 2], [(2, 0.5), (2, 0.1)]) == 1  # no full block: KV usage breaks the tie
