"""A mixture-of-experts feed-forward block: router, top-k routing, the experts through KernelOps.fused_moe, and an
optional shared expert (Qwen2-MoE). Built from plain sizes, so one layer serves every MoE family:

    Mixtral      FusedMoE(num_local_experts, num_experts_per_tok, hidden_size, intermediate_size,
                          renormalize=True, ops)
    Qwen3-MoE    FusedMoE(num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size,
                          renormalize=norm_topk_prob, ops)
    OLMoE        FusedMoE(num_experts, num_experts_per_tok, hidden_size, intermediate_size,
                          renormalize=norm_topk_prob, ops)
    Qwen2-MoE    as Qwen3-MoE, with shared_expert_intermediate_size=shared_expert_intermediate_size

Checkpoint names, relative to the block (Mixtral's `block_sparse_moe.`, the others' `mlp.`), as load_weight takes
them: the router `gate.weight`; per expert `experts.{e}.w1/w3/w2.weight` (Mixtral) or
`experts.{e}.gate_proj/up_proj/down_proj.weight` (Qwen2/3-MoE, OLMoE), which is how transformers 5 saves them
too; or the experts stacked as transformers 5 holds them in memory, `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I]; Qwen2-MoE's `shared_expert.gate_proj/up_proj/down_proj.weight` and
`shared_expert_gate.weight`.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from engine.distributed import TPGroup, tensor_parallel
from engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from kernels import KernelOps

# Checkpoint projection -> vLLM's shard name: w1 the gate, w3 the up projection (together w13), w2 the down one.
_SHARD_IDS = {"w1": "w1", "w2": "w2", "w3": "w3", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_EXPERT_WEIGHT = re.compile(r"experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_STACKED_EXPERTS = {"experts.gate_up_proj": "w13_weight", "experts.down_proj": "w2_weight"}
_SHARED_GATE_UP = {"shared_expert.gate_proj.weight": 0, "shared_expert.up_proj.weight": 1}  # halves of gate_up_proj


def fused_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in fp32, then the top_k: (topk_weights fp32 [T, k], topk_ids [T, k]), the weights
    rescaled to sum to one when renormalize."""
    topk_weights, topk_ids = torch.softmax(router_logits, dim=-1, dtype=torch.float32).topk(top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


class SharedExpert(nn.Module):
    """Qwen2-MoE's dense expert that every token takes, gate and up fused as the dense models' MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops
        with tensor_parallel(TPGroup()):  # whole on every rank, as the experts: the MoE block is not sharded
            self.gate_up_proj = MergedColumnParallelLinear(ops, hidden_size, [intermediate_size] * 2, bias=False)
            self.down_proj = RowParallelLinear(ops, intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class FusedMoE(nn.Module):
    """hidden [num_tokens, hidden_size] -> [num_tokens, hidden_size]: each token goes to the top_k experts of the
    router's softmax (weights renormalized to sum to one when `renormalize`: Mixtral always, the others when their
    config's norm_topk_prob says so), and, with `shared_expert_intermediate_size`, also through a shared expert
    scaled by a sigmoid gate. Expert weights are stacked as vLLM's: w13_weight [E, 2I, H] (gate rows, then up
    rows) and w2_weight [E, H, I]."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 ops: KernelOps, shared_expert_intermediate_size: int | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.ops, self.top_k, self.renormalize = ops, top_k, renormalize
        self.intermediate_size = intermediate_size
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.shared_expert = self.shared_expert_gate = None
        if shared_expert_intermediate_size is not None:
            self.shared_expert = SharedExpert(hidden_size, shared_expert_intermediate_size, ops)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = fused_topk(self.gate(hidden), self.top_k, self.renormalize)
        out = self.ops.fused_moe(hidden, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return out

    def load_weight(self, name: str, tensor: torch.Tensor) -> tuple[str, tuple | None]:
        """Copy one checkpoint tensor, named relative to the block (module docstring), into its place; returns
        the parameter written and the shard it filled (None: the whole parameter), for the caller's check that
        none is left unloaded (expected_shards). Unknown names: ValueError."""
        param_name, shard, rows = self._destination(name)
        if rows.shape != tensor.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(rows.shape)}")
        rows.copy_(tensor)
        return param_name, shard

    def expected_shards(self, param_name: str) -> set[tuple]:
        """The shards that load a stacked parameter piecewise: each expert's w1 and w3 (w13_weight), w2."""
        parts = ("w1", "w3") if param_name == "w13_weight" else ("w2",) if param_name == "w2_weight" else ()
        return {(expert, part) for expert in range(self.w13_weight.shape[0]) for part in parts}

    def _destination(self, name: str) -> tuple[str, tuple | None, torch.Tensor]:
        """(parameter name, shard, the part of the parameter that the checkpoint tensor `name` fills)."""
        match = _EXPERT_WEIGHT.fullmatch(name)
        if match:
            expert, shard_id = int(match[1]), _SHARD_IDS[match[2]]
            if expert >= self.w13_weight.shape[0]:
                raise ValueError(f"weight {name!r} names expert {expert} of {self.w13_weight.shape[0]}")
            if shard_id == "w2":
                return "w2_weight", (expert, shard_id), self.w2_weight.data[expert]
            # w1 fills the first half of the expert's w13 rows, w3 the second.
            half = self.intermediate_size
            rows = self.w13_weight.data[expert].narrow(0, 0 if shard_id == "w1" else half, half)
            return "w13_weight", (expert, shard_id), rows
        if name in _STACKED_EXPERTS:
            return _STACKED_EXPERTS[name], None, getattr(self, _STACKED_EXPERTS[name]).data
        if self.shared_expert is not None and name in _SHARED_GATE_UP:
            gate_up = self.shared_expert.gate_up_proj.weight.data
            half = _SHARED_GATE_UP[name]
            return "shared_expert.gate_up_proj.weight", half, gate_up.chunk(2)[half]
        params = dict(self.named_parameters())
        if name not in params:
            raise ValueError(f"unexpected mixture-of-experts weight {name!r}")
        return name, None, params[name].data
