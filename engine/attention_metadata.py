"""What attention needs to know about one step's batch; built once per step by the model runner."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """The batch holds decodes first (one query token each, longest first), then prefill chunks."""
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens in the cache after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    num_decodes: int
    num_prefill_tokens: int
    # Decode rows in groups of similar length, (start, end, max_seq_len) each: the PyTorch path pads every
    # sequence of a group to its longest, so groups cut the padding; the Triton kernel needs only one.
    decode_groups: list[tuple[int, int, int]]
    max_prefill_seq_len: int

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes
