"""Continuous batching: which requests run this step and how many tokens each, FCFS under a token budget,
with chunked prefill and preemption by recompute when the KV cache runs out."""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


class NewRequestData(NamedTuple):
    """A sequence the model runner's batch does not hold yet: first scheduled, resumed after preemption, or a
    fork's first step. It carries what the runner keeps in the sequence's row."""
    req_id: str
    token_ids: list[int]  # every token known now: the prompt, and the output of a resumed or forked sequence
    block_ids: list[int]


class SchedulerOutput(NamedTuple):
    """One step, told to the model runner as ids and counts (it keeps its own per-sequence rows, changed only
    by what this carries), never as live Request objects."""
    req_ids: list[str]  # scheduled this step, in scheduler order ("rows" below index this list)
    num_scheduled_tokens: list[int]  # per scheduled sequence: prefill chunk length or 1
    num_computed_tokens: list[int]  # per scheduled sequence: tokens in the cache before this step
    # per scheduled sequence: the token at seq_len - 1 (a decode's input, sampled last step); -1 when that step's
    # tokens are not applied yet (async scheduling): the runner reads it from the last step's sampled ids
    last_token_ids: list[int]
    new_reqs: list[NewRequestData]  # scheduled sequences the runner's batch does not hold yet
    new_block_ids: list[tuple[str, int, list[int]]]  # (req_id, first index, block ids from it) of held sequences
    finished_req_ids: list[str]  # left the runner's batch since the last step: finished, aborted, preempted
    sample_req_ids: list[str]  # one per sampled row; forks of a just-prefilled prompt repeat its row
    sample_rows: list[int]  # the scheduled row each sample_req_ids entry samples from
    blocks_to_copy: list[tuple[int, int]]  # copy-on-write (src, dst) block pairs, before the forward
    preempted_req_ids: list[str]  # sent back to the waiting queue this step

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)


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
        self.finished_req_ids: list[str] = []  # since the last schedule(): the runner drops their rows

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
        finished, self.finished_req_ids = self.finished_req_ids, []
        return SchedulerOutput([r.request_id for r in scheduled], num_tokens,
                               [r.num_computed_tokens for r in scheduled],
                               [_last_token_id(r, n) for r, n in zip(scheduled, num_tokens)],
                               *self._batch_changes(scheduled), finished, [r.request_id for r in sample_requests],
                               sample_rows, self.kv.take_blocks_to_copy(),
                               [r.request_id for r in preempted])

    @staticmethod
    def _batch_changes(scheduled: list[Request]) -> tuple[list[NewRequestData], list[tuple[str, int, list[int]]]]:
        """What the runner's batch lacks: whole rows for the sequences it does not hold, and the block ids of the
        others from the first one it does not hold (new blocks, or one that copy-on-write replaced)."""
        new_reqs, new_block_ids = [], []
        for request in scheduled:
            if request.num_synced_blocks < 0:
                new_reqs.append(NewRequestData(request.request_id, list(request.all_token_ids), list(request.block_ids)))
            elif request.num_synced_blocks < len(request.block_ids):
                start = request.num_synced_blocks
                new_block_ids.append((request.request_id, start, request.block_ids[start:]))
            request.num_synced_blocks = len(request.block_ids)
        return new_reqs, new_block_ids

    def _schedule_running(self, scheduled: list[Request], num_tokens: list[int], preempted: list[Request]) -> int:
        """Returns the token budget left."""
        budget, index = self.max_num_batched_tokens, 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self._ends_with_placeholder(request):
                index += 1  # its pending token ends it (length): nothing more to compute
                continue
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens, budget)
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
        if not self.waiting:
            return
        # Choices still to fork from a running prompt count against max_num_seqs already.
        num_seqs = len(self.running) + sum(len(r.pending_forks) for r in self.running)
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if request.num_output_placeholders:
                return  # preempted with a token still to apply (async scheduling): it resumes once that is known
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
        sampled = self.advance(output)
        self.append_tokens(sampled, sampled_token_ids)
        return sampled

    def advance(self, output: SchedulerOutput) -> list[Request]:
        """The step ran: its tokens are computed, finished prompts fork their choices, and each sequence that
        sampled awaits its token (a placeholder until append_tokens). Returns those sequences. Sequences that
        finished while the step ran (async scheduling: by the tokens of the step before) are gone: skipped."""
        scheduled = [self.requests.get(req_id) for req_id in output.req_ids]
        for request, num_new in zip(scheduled, output.num_scheduled_tokens):
            if request is not None:
                request.num_computed_tokens += num_new
                self.kv.cache_computed_blocks(request)
        sampled = []
        for req_id, row in zip(output.sample_req_ids, output.sample_rows):
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request is not scheduled[row]:
                self._fork(scheduled[row], request)
            request.num_output_placeholders += 1
            sampled.append(request)
        return sampled

    def append_tokens(self, sampled: list[Request], sampled_token_ids: list[int]) -> None:
        """Replace the sequences' placeholders by their tokens and finish those that hit max_tokens, EOS or a
        stop token. With async scheduling the next step has already computed a token that was a placeholder
        when it was scheduled, so its block may have become cacheable."""
        for request, token_id in zip(sampled, sampled_token_ids):
            assert not request.is_finished, f"{request.request_id} got a token after it finished"
            request.num_output_placeholders -= 1
            request.append_token(token_id)
            self._check_stop(request, token_id)
            if request.num_computed_tokens >= request.num_tokens:
                self.kv.cache_computed_blocks(request)
        for request in sampled:
            if request.status.finished:
                self._free(request)

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
            if request.num_computed_tokens + num_new < request.num_tokens_with_placeholders:
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
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _ends_with_placeholder(self, request: Request) -> bool:
        """Its pending token reaches max_tokens or the context (async scheduling): scheduling it would be wasted."""
        if not request.num_output_placeholders:
            return False
        num_tokens = request.num_tokens_with_placeholders
        return num_tokens - request.num_prompt_tokens >= request.max_tokens or num_tokens >= self.max_model_len

    def _free(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:  # preempted while its last token was pending (async scheduling)
            self.waiting.remove(request)
        self._free_blocks(request)
        self.requests.pop(request.request_id, None)
        for fork in request.pending_forks:  # a prompt that ends before it forked
            fork.status = request.status
            self.requests.pop(fork.request_id, None)

    def _free_blocks(self, request: Request) -> None:
        """The request leaves the runner's batch with its blocks (a preempted one comes back as new)."""
        if request.num_synced_blocks >= 0:
            self.finished_req_ids.append(request.request_id)
            request.num_synced_blocks = -1
        self.kv.free(request)


def _last_token_id(request: Request, num_new: int) -> int:
    """The token a scheduled sequence computes last; -1 for a placeholder (the previous step sampled it)."""
    position = request.num_computed_tokens + num_new - 1
    return request.all_token_ids[position] if position < request.num_tokens else -1
