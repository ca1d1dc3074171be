"""Async scheduling (EngineCore._step_overlapped) gives the plain loop's outputs, token for token: requests that
join mid-run, finish at different steps (max_tokens, stop strings, stop tokens, EOS), get preempted, aborted or
fail, with n > 1, seeds, top_p, penalties, logprobs and a grammar. Both loops run the same script on a tiny random-weight
model (fp32, CPU), step by step. Logprobs agree to float32 rounding, not bit for bit: the overlapped loop
computes (and drops) a row for a sequence that ended one step before, so some steps run other batch shapes
(the torch path's decode groups pad to other lengths), as a request joining a step earlier would."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.random_model import random_model_dir
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

CONFIG_FILE = Path(__file__).parent.parent / "bench" / "configs" / "qwen3-0.6b.json"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2,
        "max_position_embeddings": 256}
EOS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(random_model_dir(CONFIG_FILE, tmp_path_factory.mktemp("tiny") / "qwen3", TINY, torch.float32,
                                with_tokenizer=True))


def engine(model: str, async_scheduling: bool, **overrides) -> EngineCore:
    return EngineCore(EngineConfig(model=model, device="cpu", dtype="float32", kernel_backend="torch", block_size=4,
                                   max_num_seqs=16, async_scheduling=async_scheduling, **overrides))


def prompt(i: int, length: int) -> list[int]:
    return [(7 * i + 13 * t) % 500 + 3 for t in range(length)]


# Requests by the step (call of EngineCore.step) before which they join.
SCRIPT: dict[int, list[tuple[str, list[int], SamplingParams]]] = {
    0: [("greedy", prompt(0, 9), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
        ("stop-str", prompt(1, 5), SamplingParams(temperature=1.0, seed=4, max_tokens=30, stop=["5>"],
                                                  ignore_eos=True, output_kind=RequestOutputKind.DELTA)),
        ("eos", prompt(2, 6), SamplingParams(temperature=1.0, seed=11, max_tokens=40, logit_bias={EOS: 4.0},
                                             min_tokens=2)),
        ("n3", prompt(3, 7), SamplingParams(n=3, temperature=0.9, top_p=0.8, seed=5, max_tokens=9, logprobs=3,
                                            stop=["9>"]))],
    2: [("penalties", prompt(4, 11), SamplingParams(temperature=0.8, seed=3, max_tokens=14, repetition_penalty=1.5,
                                                    frequency_penalty=0.7, presence_penalty=0.4, logprobs=1)),
        ("aborted", prompt(5, 6), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
        ("stop-token", prompt(6, 8), SamplingParams(temperature=1.0, seed=8, max_tokens=25, top_k=5,
                                                    stop_token_ids=[100, 200, 300, 400], ignore_eos=True))],
    3: [("grammar", prompt(9, 5), SamplingParams(temperature=1.0, seed=9, max_tokens=20,
                                                 structured_outputs=StructuredOutputsParams(regex="[a-z]{2,8}[.]")))],
    5: [("late", prompt(7, 20), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)),
        ("late-n2", prompt(8, 4), SamplingParams(n=2, temperature=1.2, min_p=0.05, seed=2, max_tokens=11,
                                                 ignore_eos=True))],
}
ABORT_AFTER = {"aborted": 4}  # abort once the caller has seen this many of its tokens


def run(core: EngineCore) -> tuple[dict, dict]:
    """Each request's final output as comparable values, and the DELTA request's streamed tokens and text."""
    final: dict[str, RequestOutput] = {}
    streamed: dict[str, tuple[list[int], str, str | None]] = {}
    step = 0
    while step in SCRIPT or core.has_unfinished_requests() or step <= max(SCRIPT):
        for request_id, token_ids, params in SCRIPT.get(step, []):
            core.add_request(request_id, token_ids, params)
        outputs = core.step()
        for out in outputs:
            if out.request_id == "stop-str":
                tokens, text, _ = streamed.get(out.request_id, ([], "", None))
                delta = out.outputs[0]
                streamed[out.request_id] = (tokens + delta.token_ids, text + delta.text, delta.finish_reason)
            if out.finished:
                final[out.request_id] = out
            elif len(out.outputs[0].token_ids) >= ABORT_AFTER.get(out.request_id, 1 << 30):
                final[out.request_id] = core.abort_request(out.request_id)
        step += 1
    assert core.kv_cache_manager.usage == 0, "every finished sequence returns its blocks"
    core.kv_cache_manager.pool.check_integrity()
    return {request_id: comparable(out) for request_id, out in final.items()}, streamed


def comparable(out: RequestOutput) -> tuple:
    """What must be equal (prompt logprobs' ids and ranks; per choice its tokens, text, finish and stop reasons,
    its logprobs' ids), and the logprob values, which must agree to float32 rounding."""
    prompt_logprobs = [{} if p is None else p for p in out.prompt_logprobs or []]
    exact = ([{i: l.rank for i, l in p.items()} for p in prompt_logprobs],
             [(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason, [list(p) for p in c.logprobs or []])
              for c in out.outputs])
    values = ([l.logprob for p in prompt_logprobs for l in p.values()]
              + [v for c in out.outputs for p in c.logprobs or [] for v in p.values()])
    return exact, values


def assert_same_outputs(outputs: dict, expected: dict) -> None:
    assert {k: exact for k, (exact, _) in outputs.items()} == {k: exact for k, (exact, _) in expected.items()}
    for request_id, (_, values) in outputs.items():
        assert values == pytest.approx(expected[request_id][1], rel=1e-5, abs=1e-5), request_id


@pytest.fixture(scope="module")
def plain(model) -> tuple[dict, dict]:
    return run(engine(model, async_scheduling=False))


def test_async_scheduling_gives_the_plain_loops_outputs(model, plain):
    final, streamed = run(engine(model, async_scheduling=True))
    assert set(final) == {request_id for requests in SCRIPT.values() for request_id, _, _ in requests}
    assert_same_outputs(final, plain[0])
    assert streamed == plain[1]
    assert streamed["stop-str"][2] == "stop", "a stop string must end the 'stop-str' request"
    [eos] = final["eos"][0][1]
    assert eos[1][-1] == EOS and eos[3:5] == ("stop", None), "EOS must end the 'eos' request"
    [stop_token] = final["stop-token"][0][1]
    assert stop_token[3] == "stop" and stop_token[4] in (100, 200, 300, 400), "a stop token must end 'stop-token'"
    reasons = {c[3] for exact, _ in final.values() for c in exact[1]}
    assert reasons == {"length", "stop", "abort"}, "the script must end requests every way"


def test_async_scheduling_under_preemption_gives_the_plain_loops_outputs(model):
    outputs = {}
    for async_scheduling in (False, True):
        core = engine(model, async_scheduling, num_gpu_blocks_override=24)
        outputs[async_scheduling] = run(core)
        assert core.scheduler.num_preemptions > 0, "the cache must be too small for the script"
    assert_same_outputs(outputs[True][0], outputs[False][0])
    assert outputs[True][1] == outputs[False][1]


@pytest.mark.parametrize("fails", ["forward", "sampling"])
def test_a_request_that_fails_an_overlapped_step_fails_alone(model, plain, fails):
    core = engine(model, async_scheduling=True)
    if fails == "forward":
        owner, attr, batch_of = core.runner, "execute_model", lambda args: args[0].req_ids
    else:
        owner, attr, batch_of = core.sampler, "sample", lambda args: [r.request_id for r in args[1]]
    function = getattr(owner, attr)

    def failing_with_late_n2(*args):
        if any(req_id.startswith("late-n2") for req_id in batch_of(args)):
            raise RuntimeError("boom")
        return function(*args)

    setattr(owner, attr, failing_with_late_n2)
    final, _ = run(core)
    assert [c[3] for c in final.pop("late-n2")[0][1]] == ["error", "error"]
    assert_same_outputs(final, {request_id: out for request_id, out in plain[0].items() if request_id != "late-n2"})


def test_async_scheduling_reaches_the_engine():
    from server.cli import build_parser, checked_engine_config

    # The default: on with CUDA (one rank), off on a CPU.
    for argv, expected in ((["serve"], torch.cuda.is_available()), (["serve", "--async-scheduling"], True),
                           (["serve", "--no-async-scheduling"], False)):
        assert checked_engine_config(build_parser().parse_args(argv)).async_scheduling is expected


def test_llm_takes_async_scheduling(model):
    from engine import LLM

    llm = LLM(model=model, device="cpu", dtype="float32", async_scheduling=True, max_num_seqs=4)
    assert llm.engine.async_scheduling
    [out] = llm.generate([prompt(10, 5)], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 5


def test_the_servers_engine_thread_streams_the_plain_loops_tokens(model):
    """AsyncLLM (the server's engine thread) with async scheduling, the default on CUDA: concurrent streams get
    the synchronous loop's tokens, each stream ends with finished, and a stream closed early (a client that
    disconnects) gives its KV blocks back."""
    import asyncio

    from engine.async_llm import AsyncLLM

    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, top_p=0.9, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=5, max_tokens=5, ignore_eos=True)]

    async def stream(llm: AsyncLLM, request_id: str, ids: list[int], sampling: SamplingParams) -> list[int]:
        async for out in llm.generate({"prompt_token_ids": ids}, sampling, request_id):
            pass
        assert out.finished
        return out.outputs[0].token_ids

    async def scenario(async_scheduling: bool) -> list[list[int]]:
        llm = AsyncLLM(EngineConfig(model=model, device="cpu", dtype="float32", kernel_backend="torch",
                                    block_size=4, async_scheduling=async_scheduling))
        try:
            assert llm.core.async_scheduling is async_scheduling
            tokens = await asyncio.gather(*(stream(llm, f"r{i}", prompt(i, 6 + i), p) for i, p in enumerate(params)))
            long = SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)
            async for _ in llm.generate({"prompt_token_ids": prompt(9, 7)}, long, "closed-early"):
                break
            for _ in range(300):  # the abort reaches the engine thread
                if not llm.core.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            pool = llm.core.kv_cache_manager.pool
            assert pool.num_free_blocks == pool.num_blocks
            assert llm.core.num_generation_tokens < sum(map(len, tokens)) + long.max_tokens, "it ran to its end"
            return tokens
        finally:
            llm.shutdown()

    assert asyncio.run(scenario(True)) == asyncio.run(scenario(False))
