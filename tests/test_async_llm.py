"""AsyncLLM keeps the event loop free: prompts are tokenized and chat templates rendered in the tokenizer
thread, each thread with its own tokenizer instance."""
from __future__ import annotations

import asyncio
import threading

from engine import EngineConfig, SamplingParams
from engine.async_llm import AsyncLLM


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
