"""Continuous batching: which requests run this step and how many tokens each, FCFS under a token budget,
with chunked prefill and preemption by recompute when the KV cache runs out."""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


class SchedulerOutput(NamedTuple):
    requests: list[Request]  # scheduled this step, in batch order
    num_scheduled_tokens: list[int]  # per scheduled request: prefill chunk length or 1
    sample_requests: list[Request]  # one per sampled row; forks of a just-prefilled prompt repeat its row
    sample_rows: list[int]  # index into `requests` of the row each sample_requests entry samples from
    blocks_to_copy: list[tuple[int, int]]  # copy-on-write (src, dst) block pairs, before the forward
    preempted: list[Request]  # sent back to the waiting queue this step


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int) -> None:
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished sequence, forks-to-be included
        self.num_preemptions = 0

    def add_request(self, request: Request, forks: list[Request]) -> None:
        """The request prefills the prompt; `forks` (the other n-1 choices) join from its blocks afterwards."""
        request.pending_forks = forks
        for seq in (request, *forks):
            self.requests[seq.request_id] = seq
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def schedule(self) -> SchedulerOutput:
        """Running requests first (decodes and prefill chunks), then waiting ones while budget, blocks and
        max_num_seqs allow; new requests wait while this step had to preempt."""
        scheduled: list[Request] = []
        num_tokens: list[int] = []
        preempted: list[Request] = []
        budget = self._schedule_running(scheduled, num_tokens, preempted)
        if not preempted:
            self._schedule_waiting(scheduled, num_tokens, budget)
        sample_requests, sample_rows = self._sample_rows(scheduled, num_tokens)
        return SchedulerOutput(scheduled, num_tokens, sample_requests, sample_rows,
                               self.kv.take_blocks_to_copy(), preempted)

    def _schedule_running(self, scheduled: list[Request], num_tokens: list[int], preempted: list[Request]) -> int:
        """Returns the token budget left."""
        budget, index = self.max_num_batched_tokens, 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    return budget
            scheduled.append(request)
            num_tokens.append(num_new)
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, scheduled: list[Request], num_tokens: list[int], budget: int) -> None:
        # Choices still to fork from a running prompt count against max_num_seqs already.
        num_seqs = len(self.running) + sum(len(r.pending_forks) for r in self.running)
        while self.waiting and budget > 0:
            request = self.waiting[0]
            num_seqs += 1 + len(request.pending_forks)
            if num_seqs > self.max_num_seqs:
                return
            computed = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - len(computed) * self.kv.block_size, budget)
            if not self.kv.allocate_slots(request, num_new, computed):
                return
            self.waiting.popleft()
            if request.num_cached_tokens < 0:  # first admission, not a resumption after preemption
                request.num_cached_tokens = len(computed) * self.kv.block_size
                self.kv.record_prefix_lookup(request.num_tokens, request.num_cached_tokens)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(request)
            num_tokens.append(num_new)
            budget -= num_new

    def update(self, output: SchedulerOutput, sampled_token_ids: list[int]) -> list[Request]:
        """Advance the scheduled requests, append sampled tokens, fork new choices and finish those that
        hit max_tokens, EOS or a stop token. Returns the sequences that got a token this step."""
        for request, num_new in zip(output.requests, output.num_scheduled_tokens):
            request.num_computed_tokens += num_new
            self.kv.cache_computed_blocks(request)
        for request, row in zip(output.sample_requests, output.sample_rows):
            if request is not output.requests[row]:
                self._fork(output.requests[row], request)
        for request, token_id in zip(output.sample_requests, sampled_token_ids):
            request.append_token(token_id)
            self._check_stop(request, token_id)
        for request in output.sample_requests:
            if request.status.finished:
                self._free(request)
        return output.sample_requests

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Finish (abort, or stop on a stop string) sequences now; their blocks return to the pool at once."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            self._free(request)

    def _sample_rows(self, scheduled: list[Request], num_tokens: list[int]) -> tuple[list[Request], list[int]]:
        """A request samples when this step computes its last known token; a prompt that finishes also
        samples the first token of each of its forks from the same logits."""
        sample_requests, sample_rows = [], []
        for row, (request, num_new) in enumerate(zip(scheduled, num_tokens)):
            if request.num_computed_tokens + num_new < request.num_tokens:
                continue  # a prefill chunk that is not the last
            for seq in (request, *request.pending_forks):
                sample_requests.append(seq)
                sample_rows.append(row)
        return sample_requests, sample_rows

    def _fork(self, parent: Request, child: Request) -> None:
        parent.pending_forks.remove(child)
        self.kv.fork(parent, child)
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in params.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return
            if token_id in params.stop_token_ids:
                request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, token_id
                return
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _free(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        for fork in request.pending_forks:  # a prompt that ends before it forked
            fork.status = request.status
            self.requests.pop(fork.request_id, None)
