"""The offline API, shaped as vLLM's LLM: generate and chat over the same EngineCore as the server."""
from __future__ import annotations

import dataclasses
import itertools

from tqdm.auto import tqdm

from engine.beam_search import BeamSearchInstance, BeamSearchOutput, BeamSearchParams
from engine.chat_template import ChatTemplate, ChatTemplateOptions
from engine.config import EngineConfig
from engine.engine_core import EngineCore, PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 kernel_backend: str | None = None, **engine_args) -> None:
        self.engine = EngineCore(EngineConfig(model=model, device=device, dtype=dtype, kernel_backend=kernel_backend,
                                              **engine_args))
        self._ids = itertools.count()
        self._chat_template = ChatTemplate(self.engine.tokenizer)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | list[PromptType], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of the prompts. `sampling_params`: one for all prompts or one per prompt."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        request_ids = [str(next(self._ids)) for _ in prompts]
        try:
            for request_id, prompt, p in zip(request_ids, prompts, params):
                self.engine.add_request(request_id, prompt, _final_only(p))
        except ValueError:
            self._abort(request_ids)  # one bad prompt: none of the batch stays behind
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, through the model's chat template
        (or chat_template); tools: OpenAI's function tools, for the template (engine.chat_template)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        options = ChatTemplateOptions(add_generation_prompt, continue_final_message, chat_template,
                                      chat_template_kwargs or {})
        prompts = [{"prompt_token_ids": self._chat_template.token_ids(c, tools, options)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts: list[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """The beam_width best beams of each prompt (engine/beam_search.py). Every step runs one token of every
        live beam of every prompt as one batch; the beams share their prompt's KV blocks through the prefix cache."""
        instances = []
        for prompt in prompts:
            _, token_ids, max_tokens = self.engine.process_inputs(prompt, SamplingParams(max_tokens=params.max_tokens))
            instances.append(BeamSearchInstance(token_ids, max_tokens, params, self.engine.eos_token_ids))
        with tqdm(desc="Beam search", unit="step", disable=not use_tqdm) as bar:
            while live := [instance for instance in instances if not instance.done]:
                beams = [{"prompt_token_ids": beam.tokens} for instance in live for beam in instance.beams]
                outputs = iter(self.generate(beams, params.step_params, use_tqdm=False))
                for instance in live:
                    instance.advance([next(outputs) for _ in instance.beams])
                bar.update(1)
        return [BeamSearchOutput(instance.best(self.engine.tokenizer)) for instance in instances]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            try:
                while self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            bar.update(1)
            except BaseException:
                self._abort(request_ids)  # leave no blocks behind if interrupted
                raise
        return [finished[i] for i in request_ids]

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort_request(request_id)


def _final_only(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
