"""The embedding and the LM head split over the vocabulary (vLLM's names). Each rank holds ceil(vocab / size)
rows (the last rank's tail is zero padding); a token embeds to zero on every rank but its owner's, so one
all-reduce gives its row, and the ranks' logits are gathered on the rank that samples."""
from __future__ import annotations

import torch
from torch import nn

from engine.distributed import get_tp_group
from engine.layers.linear import KernelLayoutWeight
from engine.layers.sharded_weights import Loaded, copy_weight, loaded_shape, read_slice
from kernels import KernelOps


class VocabParallelEmbedding(nn.Embedding):
    """Rows looked up with the kernel backend's `embedding`: a tied model's embedding shares its LM head's weight,
    which a bf16 CPU keeps packed for its matmul (kernels/cpu_ops.py)."""

    def __init__(self, ops: KernelOps, num_embeddings: int, embedding_dim: int) -> None:
        self.tp = get_tp_group()
        self.vocab_size = num_embeddings
        rows = -(-num_embeddings // self.tp.size)
        super().__init__(rows, embedding_dim)
        self.ops = ops
        self.vocab_start = self.tp.rank * rows
        self.vocab_end = min(self.vocab_start + rows, num_embeddings)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: None = None) -> None:
        if self.tp.size == 1:
            copy_weight(param, loaded, "embedding")
            return
        if loaded_shape(loaded) != (self.vocab_size, self.embedding_dim):
            raise ValueError(f"embedding: checkpoint shape {loaded_shape(loaded)}, expected "
                             f"{(self.vocab_size, self.embedding_dim)}")
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(read_slice(loaded, 0, self.vocab_start, rows))
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.ops.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(mine, input_ids - self.vocab_start, 0)
        out = self.ops.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(KernelLayoutWeight, VocabParallelEmbedding):
    """Logits of this rank's slice of the vocabulary, gathered on rank 0; the other ranks get [tokens, 0]."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(hidden, self.weight, None)
        if self.tp.size == 1:
            return logits
        gathered = self.tp.gather(logits)
        return logits[:, :0] if gathered is None else gathered[:, :self.vocab_size]
