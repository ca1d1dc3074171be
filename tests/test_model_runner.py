"""The model runner's start-up: weights allocated once in the target dtype, and a profile step that
exercises the sampler at its largest, so the KV-cache budget on a GPU leaves room for both."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from engine.sampler import Sampler

class AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of every new storage an op creates off the meta device (an upper bound of the peak)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self.storages:
                    self.storages.add(storage.data_ptr())
                    self.total += storage.nbytes()
        return out


def test_bf16_weights_are_allocated_once_not_in_fp32_first():
    """On a GPU allocation is what counts: fp32 first, then a bf16 copy, peaks at three times the weights."""
    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096, architectures=["LlamaForCausalLM"])
    with AllocatedBytes() as allocated:
        runner = ModelRunner(EngineConfig(device="cpu", dtype="bfloat16", max_model_len=256, load_format="dummy"),
                             config, None)
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in runner.model.parameters())
    assert allocated.total < 1.5 * weights, (allocated.total, weights)


class CountingSampler(Sampler):
    def __init__(self) -> None:
        self.batches: list[list] = []

    def __call__(self, logits, requests):
        self.batches.append([r.sampling_params for r in requests])
        return super().__call__(logits, requests)


def test_profile_step_samples_max_num_seqs_rows_with_every_costly_setting():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096, architectures=["LlamaForCausalLM"])
    engine_config = EngineConfig(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=32,
                                 max_num_batched_tokens=256, load_format="dummy")
    runner = ModelRunner(engine_config, config, None)
    sampler = CountingSampler()
    runner.profile_run(sampler)
    [rows] = sampler.batches
    assert len(rows) == engine_config.max_num_seqs
    assert all(p.top_p < 1 and p.top_k and p.uses_penalties and p.logprobs and not p.greedy for p in rows)
