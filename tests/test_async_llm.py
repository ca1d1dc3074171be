"""AsyncLLM keeps the event loop free: prompts are tokenized and chat templates rendered in the tokenizer
thread, each thread with its own tokenizer instance; a template's refusal reaches the client as a 400. The
engine thread builds the core it runs."""
from __future__ import annotations

import asyncio
import threading

import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine import EngineConfig, SamplingParams
from engine.async_llm import AsyncLLM
from engine.engine_core import EngineCore
from server.app import ServerOptions, build_app


def record_threads(tokenizer, method: str, calls: list[str]) -> None:
    original = getattr(tokenizer, method)

    def recorded(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return original(*args, **kwargs)

    setattr(tokenizer, method, recorded)


def test_prompts_and_chat_templates_are_tokenized_off_the_event_loop_by_a_tokenizer_of_their_own():
    async def scenario():
        llm = AsyncLLM(EngineConfig(device="cpu", dtype="float32", max_model_len=256))
        tokenizers = [llm.tokenizer, llm.core.tokenizer, llm._prompt_tokenizer]
        assert len({id(t) for t in tokenizers}) == 3, "the loop, the engine and the tokenizer thread share none"
        calls: list[str] = []
        for tokenizer in tokenizers:
            record_threads(tokenizer, "encode", calls)
            record_threads(tokenizer, "apply_chat_template", calls)
        try:
            prompt = await llm.apply_chat_template([{"role": "user", "content": "Hi"}])
            assert prompt and await llm.encode("Hello world")
            async for out in llm.generate("A text prompt", SamplingParams(max_tokens=2), "text"):
                pass
            assert out.finished
        finally:
            llm.shutdown()
        assert calls and threading.current_thread().name not in calls
        assert set(calls) == {name for name in calls if name.startswith("tokmodel-tokenizer")}

    asyncio.run(scenario())


def test_a_chat_template_that_refuses_the_messages_is_a_400_on_messages(async_llm):
    """Templates raise for conversations they cannot render (roles that do not alternate, say): the user's
    mistake, told in the template's own words, not a 500."""
    refusing = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"

    async def scenario() -> None:
        async with TestClient(TestServer(build_app(async_llm, ServerOptions()))) as client:
            for path in ("/v1/chat/completions", "/tokenize"):
                response = await client.post(path, json={"messages": [{"role": "user", "content": "Hi"}]})
                assert response.status == 400, await response.text()
                error = (await response.json())["error"]
                assert error["param"] == "messages" and "roles must alternate" in error["message"]

    original = async_llm._prompt_tokenizer.chat_template
    async_llm._prompt_tokenizer.chat_template = refusing
    try:
        asyncio.run(scenario())
    finally:
        async_llm._prompt_tokenizer.chat_template = original


def test_the_engine_thread_builds_the_core_it_runs(monkeypatch):
    """The model is loaded and warmed up in the thread that steps it: a CPU's OpenMP keeps a team per thread that
    ever ran a parallel op, and a second one (the loader's) slows every parallel op of every step (the README's
    batch-1 figures). A core that fails to build raises from AsyncLLM() itself."""
    built_in = []

    class RecordingCore(EngineCore):
        def __init__(self, config):
            built_in.append(threading.current_thread().name)
            super().__init__(config)

    monkeypatch.setattr("engine.async_llm.EngineCore", RecordingCore)
    llm = AsyncLLM(EngineConfig(device="cpu", dtype="float32", max_model_len=256))
    try:
        assert built_in == [llm._thread.name] != [threading.current_thread().name]
    finally:
        llm.shutdown()
    with pytest.raises(ValueError, match="max_model_len"):
        AsyncLLM(EngineConfig(device="cpu", dtype="float32", max_model_len=10 ** 9))
