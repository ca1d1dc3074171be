"""Phi-3 and Phi-4 (Phi3ForCausalLM): Llama whose checkpoint already stores q/k/v as one qkv_proj and gate/up
as one gate_up_proj, the engine's own parameters, so nothing is stacked at load. LongRoPE ("su") scaling and
Phi-4-mini's partial rotary factor come from config.json through layers/rotary.py."""
from __future__ import annotations

from engine.models.llama import LlamaForCausalLM
from engine.models.weight_loading import StackedParams


class Phi3ForCausalLM(LlamaForCausalLM):
    stacked_params: StackedParams = []
