"""The model runner's persistent batch (vLLM's InputBatch): one row per sequence the runner holds, kept between
steps and changed only where a sequence joins, leaves or grows, so that preparing a step costs NumPy over the
rows, not Python over every token of every request."""
from __future__ import annotations

import numpy as np

from engine.scheduler import SchedulerOutput


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, max_blocks_per_seq: int) -> None:
        self.max_model_len = max_model_len
        self.req_ids: list[str] = []  # row -> sequence; rows are packed: a leaving row takes the last one's place
        self.row_of: dict[str, int] = {}
        # np.zeros maps fresh zero pages: a context that is never reached costs no memory.
        self.token_ids = np.zeros((max_num_seqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_seqs, dtype=np.int64)  # of each row's token_ids that are set
        self.block_table = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_seqs, dtype=np.int64)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    def update(self, output: SchedulerOutput) -> None:
        """Apply what the scheduler says changed: rows leave, rows join, held rows get new block ids, and every
        scheduled row gets the token it computes last (for a decode, the one sampled last step)."""
        for req_id in output.finished_req_ids:
            self.remove(req_id)
        for new in output.new_reqs:
            self._add(new.req_id, new.token_ids, new.block_ids)
        for req_id, start, block_ids in output.new_block_ids:
            row = self.row_of[req_id]
            self.block_table[row, start:start + len(block_ids)] = block_ids
            self.num_blocks[row] = start + len(block_ids)
        rows = self.rows(output.req_ids)
        last = np.asarray(output.num_computed_tokens) + np.asarray(output.num_scheduled_tokens) - 1
        self.token_ids[rows, last] = output.last_token_ids
        self.num_tokens[rows] = np.maximum(self.num_tokens[rows], last + 1)

    def rows(self, req_ids: list[str]) -> np.ndarray:
        return np.fromiter(map(self.row_of.__getitem__, req_ids), dtype=np.int64, count=len(req_ids))

    def _add(self, req_id: str, token_ids: list[int], block_ids: list[int]) -> None:
        assert req_id not in self.row_of, f"{req_id} already has a row"
        row = len(self.req_ids)
        self.req_ids.append(req_id)
        self.row_of[req_id] = row
        self.token_ids[row, :len(token_ids)] = token_ids
        self.num_tokens[row] = len(token_ids)
        self.block_table[row, :len(block_ids)] = block_ids
        self.num_blocks[row] = len(block_ids)

    def remove(self, req_id: str) -> None:
        row = self.row_of.pop(req_id)
        last = len(self.req_ids) - 1
        moved = self.req_ids.pop()
        if row == last:
            return
        self.req_ids[row] = moved
        self.row_of[moved] = row
        num_tokens, num_blocks = self.num_tokens[last], self.num_blocks[last]
        self.token_ids[row, :num_tokens] = self.token_ids[last, :num_tokens]
        self.num_tokens[row] = num_tokens
        self.block_table[row, :num_blocks] = self.block_table[last, :num_blocks]
        self.num_blocks[row] = num_blocks
