"""POST /v1/completions (the legacy text API): several prompts, token-id prompts, echo."""
from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING

from aiohttp import web

from engine.outputs import CompletionOutput
from server.beam_search import beam_search_params
from server.choices import Choice
from server.fields import COMPLETION_REFUSED, check_fields
from server.generation import generate_many
from server.logprobs import completion_logprobs, prompt_logprobs_json, sample_entries
from server.protocol import (COMPLETION_FIELDS, check_model, check_types, completion_prompts, read_json,
                             require_tokenizer, sampling_params, stream_options, vocab_size)
from server.serving import Completion
from server.state import STATE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


class TextCompletion(Completion):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, *args, echoed: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.echoed = echoed  # per prompt: the prompt text when echo is on, else ""

    def chunk_choice(self, index: int, delta: CompletionOutput, first: bool) -> dict | None:
        if not (first or delta.text or delta.finish_reason or delta.token_ids):
            return None
        echoed = self.echoed[self.collector.prompt_of(index)]
        echo = echoed if first else ""
        # Offsets count from the start of the choice's text (the echo, then the text, which holds this delta).
        offset = len(echoed) + len(self.collector.choices[index].text) - len(delta.text)
        choice = {"index": index, "text": echo + delta.text, "finish_reason": delta.finish_reason,
                  "logprobs": self._logprobs(index, delta.token_ids, delta.logprobs, offset, first and bool(echo))}
        if first and self.return_token_ids:
            choice["prompt_token_ids"] = self.collector.prompt_token_ids[self.collector.prompt_of(index)]
        return choice

    def final_choice(self, index: int, choice: Choice) -> dict:
        prompt = self.collector.prompt_of(index)
        echo = self.echoed[prompt]
        prompt_logprobs = self.collector.prompt_logprobs.get(prompt)
        return {"index": index, "text": echo + choice.text,
                "logprobs": self._logprobs(index, choice.token_ids, choice.logprobs, 0, bool(echo)),
                "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason,
                "token_ids": self.token_ids(choice.token_ids), "prompt_logprobs": prompt_logprobs_json(prompt_logprobs),
                "prompt_token_ids": self.token_ids(self.collector.prompt_token_ids[prompt])}

    def _logprobs(self, index: int, token_ids: list[int], logprobs: list[dict[int, float]] | None, offset: int,
                  with_prompt: bool) -> dict | None:
        """The tokens' logprobs; with_prompt: the echoed prompt's first (its prompt logprobs), from offset 0."""
        if self.top_logprobs is None:
            return None
        if with_prompt:
            prompt = self.collector.prompt_of(index)
            token_ids = self.collector.prompt_token_ids[prompt] + token_ids
            logprobs = sample_entries(self.collector.prompt_logprobs[prompt]) + (logprobs or [])
            offset = 0
        if not logprobs:
            return None
        return completion_logprobs(self.token_name, token_ids, logprobs, self.top_logprobs, offset)


async def create_completion(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    llm = state.llm
    body = await read_json(request)
    check_fields(body, COMPLETION_FIELDS, COMPLETION_REFUSED)
    check_types(body, COMPLETION_FIELDS)
    check_model(body, llm.model_name)
    options = stream_options(body)
    max_tokens = body.get("max_tokens", _DEFAULT_MAX_TOKENS)
    params = sampling_params(body, max_tokens, body.get("logprobs"), vocab_size(llm))
    beam = beam_search_params(body, params)
    prompts = completion_prompts(body, vocab_size(llm))
    if any(isinstance(p, str) for p in prompts) or body.get("echo") or params.logprobs is not None:
        require_tokenizer(llm)
    if body.get("echo") and params.logprobs is not None and params.prompt_logprobs is None:
        # The echoed prompt's tokens get logprobs as the generated ones do (as vLLM).
        params = dataclasses.replace(params, prompt_logprobs=params.logprobs)
    echoed = [_prompt_text(llm.tokenizer, p) if body.get("echo") else "" for p in prompts]
    completion = TextCompletion(f"cmpl-{uuid.uuid4().hex}", llm.model_name, params.n, options, params.logprobs,
                                llm.tokenizer, body, echoed=echoed)
    return await completion.respond(request, generate_many(state, prompts, params, completion.id, beam))


def _prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
