"""Tensor parallelism over gloo on the CPU: two ranks (the engine's process and one spawned worker) give the
greedy tokens (and prompt logprobs) of one rank, through chunked prefill, prefix-cache hits, preemption and
n > 1; so do the default model on three ranks and two "nodes" on loopback; a model that cannot be split is
refused by name; a killed worker fails the requests in flight and the server, not a hang."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from engine import LLM, AsyncLLM, EngineConfig, SamplingParams
from engine.executor import _free_port, check_tensor_parallel
from server.app import ServerOptions, build_app
from server_fixtures import serving_in_process

TP = 2
BLOCK_SIZE = 4
# Few blocks: the batch below outgrows them, so the scheduler preempts and recomputes.
NUM_BLOCKS = 40
COMMON = dict(vocab_size=251,  # not a multiple of TP: the last rank's vocabulary shard is padded
              hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
CONFIGS = {
    # KV heads split over the ranks, one each; the LM head tied to the embedding
    "llama-kv2": LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    # one KV head for two ranks: replicated; q/k/v biases sliced with their rows
    "qwen2-kv1": Qwen2Config(**COMMON, num_key_value_heads=1, tie_word_embeddings=False),
}
REPO = Path(__file__).resolve().parents[1]
SHARED = list(range(10, 30))  # five blocks the second prompt shares with the first


def _save_model(config: PretrainedConfig, out_dir: Path) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(_save_model(CONFIGS[request.param], tmp_path_factory.mktemp(request.param)))


ENGINE_ARGS = dict(dtype="float32", block_size=BLOCK_SIZE, num_gpu_blocks_override=NUM_BLOCKS, max_num_batched_tokens=32)


def _run(model: str, tensor_parallel_size: int, **node_args) -> tuple[list, list[int], int, list[dict]]:
    """(token ids per request and choice, cached prompt tokens per request, preemptions, the last prompt's
    logprobs: its own token's and the top 2 per position) of a greedy batch run after the first prompt alone, whose
    blocks the second prompt then finds in the prefix cache."""
    llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, **ENGINE_ARGS, **node_args)
    try:
        prompts = [SHARED + [40, 41], SHARED + [50, 51, 52], [7, 8, 9] * 5, list(range(100, 117))]
        greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        llm.generate([prompts[0]], greedy, use_tqdm=False)
        # The last request also asks for its prompt's logprobs: rows that go through the gathered lm_head too.
        params = [greedy, greedy, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, n=2),
                  SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        prompt_logprobs = [{token: p.logprob for token, p in position.items()}
                           for position in outputs[-1].prompt_logprobs[1:]]
        return ([[list(c.token_ids) for c in o.outputs] for o in outputs], [o.num_cached_tokens for o in outputs],
                llm.engine.get_stats().num_preemptions, prompt_logprobs)
    finally:
        llm.engine.shutdown()


def test_two_ranks_give_the_greedy_tokens_of_one(model_path: str) -> None:
    tokens, cached, preemptions, prompt_logprobs = _run(model_path, TP)
    expected_tokens, expected_cached, _, expected_prompt_logprobs = _run(model_path, 1)
    assert tokens == expected_tokens
    assert [set(p) for p in prompt_logprobs] == [set(p) for p in expected_prompt_logprobs]
    for position, expected in zip(prompt_logprobs, expected_prompt_logprobs):
        assert all(abs(position[token] - logprob) < 1e-4 for token, logprob in expected.items())
    assert cached == expected_cached and cached[1] == len(SHARED), "the second prompt missed the prefix cache"
    assert preemptions > 0, "the batch was meant to outgrow the KV cache"
    assert len(tokens[2]) == 2 and len(prompt_logprobs) == 16


def test_two_nodes_on_loopback_give_the_greedy_tokens_of_one_rank(tmp_path: Path) -> None:
    """Node 1 is `serve --node-rank 1` in a process of its own (its rank a worker it spawns); node 0 is the engine
    here. They meet at master_addr:master_port over gloo, and steps reach node 1 by broadcast, not shared memory."""
    model = str(_save_model(CONFIGS["llama-kv2"], tmp_path))
    port = _free_port()
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in ENGINE_ARGS.items()]
    node1 = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", model, *flags,
                              "--tensor-parallel-size=2", "--nnodes=2", "--node-rank=1", "--master-addr=127.0.0.1",
                              f"--master-port={port}"], cwd=REPO)
    try:
        tokens = _run(model, TP, nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=port)[0]
        assert node1.wait(timeout=60) == 0, "node 1 must exit cleanly when node 0 shuts down"
    finally:
        node1.kill()
    assert tokens == _run(model, 1)[0]


def test_a_model_that_does_not_split_is_refused_by_name(model_dir: Path) -> None:
    """The default model has 9 attention heads: two ranks cannot share them (three can)."""
    config = AutoConfig.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 must divide the model's attention heads"):
        check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        LLM(model=str(model_dir), tensor_parallel_size=2)


def test_the_default_model_on_three_ranks_gives_the_greedy_tokens_of_one(model_dir: Path) -> None:
    """Its 9 heads and 3 KV heads split over three ranks, one KV head each."""
    prompts = [list(range(100, 120)), [7, 8, 9] * 4]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def tokens(tensor_parallel_size: int) -> list[list[int]]:
        llm = LLM(model=str(model_dir), dtype="float32", tensor_parallel_size=tensor_parallel_size, max_model_len=256)
        try:
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
        finally:
            llm.engine.shutdown()

    assert tokens(3) == tokens(1)


def test_a_killed_worker_fails_requests_in_flight_and_the_server(tmp_path: Path) -> None:
    model = str(_save_model(CONFIGS["llama-kv2"], tmp_path))
    llm = AsyncLLM(EngineConfig(model=model, dtype="float32", tensor_parallel_size=TP))
    [worker] = llm.core.runner.workers
    body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def serve_until_the_worker_dies() -> tuple[list[bytes], int]:
        async with serving_in_process(llm, ServerOptions()) as server:
            async with server.session.post("/v1/completions", json=body) as stream:
                assert stream.status == 200
                while llm.get_stats().num_running_reqs < 1:
                    await asyncio.sleep(0.02)
                os.kill(worker.pid, signal.SIGKILL)
                events = [line[len(b"data: "):].strip() async for line in stream.content if line.startswith(b"data: ")]
            return events, await asyncio.wait_for(server.serving, timeout=30)

    async def health() -> int:
        async with TestClient(TestServer(build_app(llm, ServerOptions()))) as client:
            return (await client.get("/health")).status

    try:
        events, exit_code = asyncio.run(serve_until_the_worker_dies())
        assert events[-1] == b"[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "engine_dead"
        assert f"pid {worker.pid}" in str(llm.dead_error)
        assert exit_code == 1
        assert asyncio.run(health()) == 503
    finally:
        llm.shutdown()
