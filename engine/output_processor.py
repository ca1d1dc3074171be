"""From sampled tokens to RequestOutputs: per-choice text, stop strings, n choices gathered per request."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.detokenizer import IncrementalDetokenizer, token_texts
from engine.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from engine.request import Request, RequestStatus
from engine.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("tokmodel.engine")


class ProcessedOutputs(NamedTuple):
    outputs: list[RequestOutput]  # to hand out
    stopped: list[str]  # sequences a stop string ended: the scheduler must free them
    failed: list[str]  # requests whose output could not be processed: the engine fails them alone


@dataclass
class ChoiceState:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_sent_tokens: int = 0  # for DELTA outputs: what the caller has already been given
    num_sent_chars: int = 0
    final_sent: bool = False


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[ChoiceState]
    arrival_time: float
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # once the prompt is computed, when the request asked
    prompt_logprobs_sent: bool = False
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0  # of all its sequences
    num_finished_choices: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished_choices == len(self.choices)

    def finish_choice(self, choice: ChoiceState, finish_reason: str, stop_reason: str | int | None) -> None:
        if choice.finish_reason is None:
            self.num_finished_choices += 1
            choice.finish_reason, choice.stop_reason = finish_reason, stop_reason


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> None:
        choices = [ChoiceState(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                                         params.stop, params.include_stop_str_in_output,
                                                         params.min_tokens)) for i in range(params.n)]
        self.states[request_id] = RequestState(request_id, prompt, prompt_token_ids, params, choices, arrival_time)

    def mark_scheduled(self, requests: list[Request], now: float) -> None:
        for request in requests:
            state = self.states.get(request.parent_id)
            if state is not None and state.first_scheduled_time is None:
                state.first_scheduled_time = now
                state.num_cached_tokens = max(request.num_cached_tokens, 0)

    def mark_preempted(self, requests: list[Request]) -> None:
        for request in requests:
            state = self.states.get(request.parent_id)
            if state is not None:
                state.num_preemptions += 1

    def process(self, sequences: list[Request], logprobs: SampleLogprobs) -> ProcessedOutputs:
        """Take one new token per sequence. A request whose token cannot be processed (its detokenizer
        raised) is left out of the outputs and returned as failed; the others go on."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        failed: dict[str, None] = {}
        for seq, token_logprobs in zip(sequences, logprobs):
            if seq.parent_id in failed:
                continue
            state = self.states[seq.parent_id]
            try:
                if self._take_token(state, seq, token_logprobs):
                    stopped.append(seq.request_id)
            except Exception:
                logger.exception("processing the output of request %s failed", seq.parent_id)
                failed[seq.parent_id] = None
                touched.pop(seq.parent_id, None)
                continue
            touched[state.request_id] = state
        now = time.time()
        outputs = []
        for state in touched.values():
            state.first_token_time = state.first_token_time or now
            state.last_token_time = now
            finished = state.finished
            if finished or state.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                if (out := self._make_output(state, now, finished)) is not None:
                    outputs.append(out)
            if finished:
                del self.states[state.request_id]
        return ProcessedOutputs(outputs, stopped, list(failed))

    def _take_token(self, state: RequestState, seq: Request, token_logprobs: dict[int, float]) -> bool:
        """Appends the sequence's newest token to its choice; True when a stop string ended a sequence the
        scheduler still runs."""
        choice, params, status = state.choices[seq.index], state.params, seq.status
        token_id = seq.all_token_ids[-1]
        choice.token_ids.append(token_id)
        if params.logprobs is not None:
            choice.logprobs.append(token_logprobs)
        if seq.index == 0 and params.prompt_logprobs is not None and state.prompt_logprobs is None:
            state.prompt_logprobs = [None, *self._with_decoded_tokens(seq.prompt_logprobs)]
        # The end or stop token that finished the sequence stays in token_ids but not in the text (as vLLM),
        # even when special tokens are kept: "<|im_end|>" is no part of the answer; unless the request asked for
        # its stop in the text.
        detokenizer = choice.detokenizer
        if status is not RequestStatus.FINISHED_STOPPED or params.include_stop_str_in_output:
            detokenizer.add_token(token_id)
        if status.finished or params.output_kind is not RequestOutputKind.FINAL_ONLY:
            detokenizer.flush()  # the text is read this step: a token that cannot be decoded fails here
        if detokenizer.stop_reason is not None:
            state.finish_choice(choice, "stop", detokenizer.stop_reason)
            return not status.finished
        if status.finished:
            state.finish_choice(choice, status.finish_reason, seq.stop_reason)
        return False

    def _with_decoded_tokens(self, prompt_logprobs: list[dict[int, Logprob]]) -> list[dict[int, Logprob]]:
        if self.tokenizer is not None:
            texts = token_texts(self.tokenizer)
            for position in prompt_logprobs:
                for token_id, logprob in position.items():
                    logprob.decoded_token = texts[token_id] if token_id < len(texts) else ""
        return prompt_logprobs

    def finish(self, request_id: str, finish_reason: str) -> RequestOutput | None:
        """End a request now (aborted, or failed in the engine): its unfinished choices take finish_reason.
        Returns its last output, or None if it is unknown or that output would be empty."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for choice in state.choices:
            state.finish_choice(choice, finish_reason, None)
            try:
                choice.detokenizer.flush()
            except Exception:  # the text stays what it was: the request ends anyway
                logger.exception("decoding the output of request %s failed", request_id)
        return self._make_output(state, time.time(), finished=True)

    def _make_output(self, state: RequestState, now: float, finished: bool) -> RequestOutput | None:
        """The request's output now (None when a delta would be empty); FINAL_ONLY asks only once finished."""
        kind = state.params.output_kind
        completions = []
        for choice in state.choices:
            completion = self._completion(choice, kind is RequestOutputKind.DELTA)
            if completion is not None:
                completions.append(completion)
        if not completions:
            return None
        metrics = {"arrival_time": state.arrival_time, "first_scheduled_time": state.first_scheduled_time,
                   "first_token_time": state.first_token_time, "last_token_time": state.last_token_time,
                   "num_preemptions": state.num_preemptions}
        if finished:
            metrics["finished_time"] = now
        prompt_logprobs = state.prompt_logprobs
        if kind is RequestOutputKind.DELTA:  # given once, with the first output
            prompt_logprobs, state.prompt_logprobs_sent = (None if state.prompt_logprobs_sent else prompt_logprobs), True
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions, finished,
                             state.num_cached_tokens, prompt_logprobs, metrics)

    def _completion(self, choice: ChoiceState, delta: bool) -> CompletionOutput | None:
        finished = choice.finish_reason is not None
        text = choice.detokenizer.visible_text(finished)
        if not delta:
            return CompletionOutput(choice.index, text, list(choice.token_ids), choice.finish_reason,
                                    choice.stop_reason, list(choice.logprobs) if choice.logprobs else None)
        nothing_new = choice.num_sent_tokens == len(choice.token_ids) and choice.num_sent_chars == len(text)
        if choice.final_sent or (nothing_new and not finished):
            return None
        out = CompletionOutput(choice.index, text[choice.num_sent_chars:], choice.token_ids[choice.num_sent_tokens:],
                               choice.finish_reason, choice.stop_reason,
                               choice.logprobs[choice.num_sent_tokens:] if choice.logprobs else None)
        choice.num_sent_tokens, choice.num_sent_chars = len(choice.token_ids), len(text)
        choice.final_sent = finished
        return out
