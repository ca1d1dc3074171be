"""One request never harms another: a request that makes a step fail fails alone, the others finish as if it
had never been there; an error the engine cannot survive kills it cleanly. Faults are injected into the real
engine (the model runner, the sampler, the detokenizer) for requests with a poisoned seed."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from engine import EngineConfig, SamplingParams
from engine.async_llm import AsyncLLM
from engine.engine_core import EngineCore
from engine.errors import EngineDeadError
from server.app import ServerOptions, build_app
from tests.reference import hf_greedy

POISON_SEED = 666
MAX_TOKENS = 6
GOOD_PROMPTS = {"good-1": "The capital of France is", "good-2": "List three colors:"}
CONFIG = EngineConfig(device="cpu", dtype="float32", kernel_backend="torch", max_model_len=512)


def poisoned(requests) -> bool:
    """A poisoned request breaks the step from its third token on: its first ones have been streamed already."""
    return any(r.sampling_params.seed == POISON_SEED and r.num_output_tokens >= 2 for r in requests)


def fail_when_poisoned(function, error: Exception, batch_of):
    """`function` (the runner's forward or the sampler) raising `error` whenever the batch holds a poisoned request;
    batch_of(args) gives the batch's requests."""
    def wrapped(*args):
        if poisoned(batch_of(args)):
            raise type(error)(*error.args)
        return function(*args)
    return wrapped


def poison_forward(engine: EngineCore, error: Exception) -> None:
    engine.runner.execute_model = fail_when_poisoned(
        engine.runner.execute_model, error, lambda args: [engine.scheduler.requests[i] for i in args[0].req_ids])


def poison_sampler(engine: EngineCore, error: Exception) -> None:
    engine.sampler.sample = fail_when_poisoned(engine.sampler.sample, error, lambda args: args[1])


@pytest.fixture(scope="module")
def reference(hf_model, tokenizer) -> dict[str, list[int]]:
    return {rid: hf_greedy(hf_model, tokenizer.encode(prompt), MAX_TOKENS) for rid, prompt in GOOD_PROMPTS.items()}


@pytest.fixture
def engine() -> EngineCore:
    return EngineCore(CONFIG)


def run_with_a_poisoned_request(engine: EngineCore) -> dict:
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine.add_request("good-1", GOOD_PROMPTS["good-1"], greedy)
    engine.add_request("bad", "Anything at all", SamplingParams(n=2, seed=POISON_SEED, max_tokens=MAX_TOKENS))
    engine.add_request("good-2", GOOD_PROMPTS["good-2"], greedy)
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    return final


@pytest.mark.parametrize("inject", [poison_forward, poison_sampler])
def test_a_request_that_fails_the_step_fails_alone(engine, reference, inject):
    inject(engine, RuntimeError("boom"))
    final = run_with_a_poisoned_request(engine)
    assert [c.finish_reason for c in final["bad"].outputs] == ["error", "error"]
    for request_id, expected in reference.items():
        [choice] = final[request_id].outputs
        assert (choice.token_ids, choice.finish_reason) == (expected, "length")
    assert engine.kv_cache_manager.usage == 0, "the failed request must return its blocks"
    engine.kv_cache_manager.pool.check_integrity()


def test_a_request_whose_output_cannot_be_detokenized_fails_alone(engine, reference):
    final_outputs = {}

    def add_and_break(request_id, prompt, params):
        engine.add_request(request_id, prompt, params)
        if params.seed == POISON_SEED:
            for choice in engine.output_processor.states[request_id].choices:
                choice.detokenizer.add_token = lambda token_id: (_ for _ in ()).throw(KeyError(token_id))

    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    add_and_break("good-1", GOOD_PROMPTS["good-1"], greedy)
    add_and_break("bad", "Anything at all", SamplingParams(seed=POISON_SEED, max_tokens=MAX_TOKENS))
    add_and_break("good-2", GOOD_PROMPTS["good-2"], greedy)
    while engine.has_unfinished_requests():
        final_outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert final_outputs["bad"].outputs[0].finish_reason == "error"
    for request_id, expected in reference.items():
        assert final_outputs[request_id].outputs[0].token_ids == expected
    assert engine.kv_cache_manager.usage == 0


def test_a_cuda_error_kills_the_engine(engine):
    poison_forward(engine, torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(EngineDeadError, match="illegal memory access"):
        run_with_a_poisoned_request(engine)


async def collect(llm: AsyncLLM, request_id: str, prompt: str, params: SamplingParams):
    """The request's outputs, or the exception that ended its stream."""
    outputs = []
    try:
        async for out in llm.generate(prompt, params, request_id):
            outputs.append(out)
    except Exception as error:
        return error
    return outputs


def test_async_engine_death_fails_every_request_and_refuses_new_ones():
    async def scenario():
        llm = AsyncLLM(CONFIG)
        try:
            poison_forward(llm.core, torch.AcceleratorError("CUDA error: device-side assert triggered"))
            params = SamplingParams(max_tokens=50, ignore_eos=True)
            healthy = asyncio.create_task(collect(llm, "healthy", "Hello", params))
            await asyncio.sleep(0.5)
            fatal = await collect(llm, "fatal", "Hello", SamplingParams(seed=POISON_SEED))
            assert isinstance(fatal, EngineDeadError) and isinstance(await healthy, EngineDeadError)
            assert llm.errored
            assert isinstance(await collect(llm, "later", "Hello", params), EngineDeadError)
        finally:
            llm.shutdown()

    asyncio.run(scenario())


def test_a_request_that_breaks_admission_fails_alone_and_the_engine_goes_on():
    async def scenario():
        llm = AsyncLLM(CONFIG)
        add_request = llm.core.add_request

        def broken_for_the_poisoned(request_id, prompt, params, arrival_time=None):
            add_request(request_id, prompt, params, arrival_time)
            if params.seed == POISON_SEED:
                raise TypeError("a bug on this request's path")

        llm.core.add_request = broken_for_the_poisoned
        try:
            failed = await collect(llm, "bad", "Hello", SamplingParams(seed=POISON_SEED))
            assert isinstance(failed, RuntimeError) and "TypeError" in str(failed)
            outputs = await collect(llm, "fine", "Hello", SamplingParams(max_tokens=4, ignore_eos=True))
            assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
            assert llm.core.kv_cache_manager.usage == 0 and not llm.core.has_unfinished_requests()
        finally:
            llm.shutdown()

    asyncio.run(scenario())


async def sse_events(client: TestClient, body: dict) -> list:
    response = await client.post("/v1/chat/completions", json=body | {"stream": True})
    assert response.status == 200
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            data = line[len(b"data: "):].strip()
            events.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return events


def test_over_http_the_poisoned_stream_gets_an_error_event_and_the_others_finish():
    async def scenario():
        llm = AsyncLLM(CONFIG)
        poison_sampler(llm.core, RuntimeError("Overflow when unpacking long long"))
        client = TestClient(TestServer(build_app(llm, ServerOptions())))
        await client.start_server()
        try:
            good = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            streams = [sse_events(client, good), sse_events(client, good | {"seed": POISON_SEED}),
                       sse_events(client, good | {"temperature": 0})]
            first, bad, second = await asyncio.gather(*streams)
            for events in (first, second):
                *chunks, usage, done = events
                assert done == "[DONE]" and usage["usage"]["completion_tokens"] == 8
                assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
            assert bad[-1] == "[DONE]" and bad[0]["choices"][0]["delta"]["role"] == "assistant"
            error = bad[-2]["error"]
            assert error["code"] == "internal_error" and "Overflow" not in error["message"]
            assert llm.core.kv_cache_manager.usage == 0
        finally:
            await client.close()
            llm.shutdown()

    asyncio.run(scenario())
