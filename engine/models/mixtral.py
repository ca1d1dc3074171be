"""Mixtral: Mistral's attention (a sliding window where config.json sets one) with a mixture of experts for the
MLP: softmax over the experts, the top num_experts_per_tok, always renormalized."""
from __future__ import annotations

from engine.layers.moe import FusedMoE
from engine.models.llama import LlamaForCausalLM
from kernels import KernelOps


class MixtralMoE(FusedMoE):
    def __init__(self, config, ops: KernelOps) -> None:
        super().__init__(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                         config.intermediate_size, renormalize=True, ops=ops)


class MixtralForCausalLM(LlamaForCausalLM):
    mlp_class = MixtralMoE
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}
