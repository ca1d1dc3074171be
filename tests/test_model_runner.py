"""The model runner's start-up: weights allocated once in the target dtype, and packed for the CPU's bf16 matmul;
a profile step that exercises the sampler at its largest, so the KV-cache budget on a GPU leaves room for both;
and a warm-up after which serving compiles no new kernel variant."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.model_runner import ModelRunner
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from kernels import cpu_ops
from tests.kernel_launches import launches  # noqa: F401 (fixture)

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
    # The torch backend: the CPU one then packs each linear weight for its C kernel, one transient copy at a time,
    # which this count (every storage ever made) cannot tell from a second model.
    with AllocatedBytes() as allocated:
        runner = ModelRunner(EngineConfig(device="cpu", dtype="bfloat16", max_model_len=256, load_format="dummy",
                                          kernel_backend="torch"), config, None)
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in runner.model.parameters())
    assert allocated.total < 1.5 * weights, (allocated.total, weights)


@pytest.mark.skipif(not cpu_ops.linear_available(), reason="packing is for kernels/cpu/linear.c (AVX-512 BF16)")
def test_cpu_bf16_linear_weights_are_packed_and_a_tied_embedding_shares_the_head():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    unpacked = ModelRunner(EngineConfig(device="cpu", dtype="bfloat16", max_model_len=64, load_format="dummy",
                                        kernel_backend="torch"), config, None).model
    model = ModelRunner(EngineConfig(device="cpu", dtype="bfloat16", max_model_len=64, load_format="dummy",
                                     kernel_backend="cpu"), config, None).model
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == (128 // 32, 64 // 2, 32, 2)
    head = model.lm_head.weight
    assert head.dim() == 4 and model.model.embed_tokens.weight is head, "one packed copy, shared"
    # The same dummy weights (one seed): the packed ones unpack to them, and the embedding finds every row.
    assert torch.equal(cpu_ops.unpack_linear_weight(head), unpacked.lm_head.weight)
    ids = torch.tensor([[0, 5, 31], [32, 200, 255]])
    assert torch.equal(model.model.embed_tokens(ids), unpacked.model.embed_tokens(ids))


class CountingSampler(Sampler):
    def __init__(self) -> None:
        super().__init__()
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
    assert all(p.top_p < 1 and not p.top_k and p.uses_penalties and p.logprobs and p.seed is not None and not p.greedy
               for p in rows)


def test_after_warm_up_serving_varied_batches_launches_no_new_kernel_variant(launches, tmp_path):
    """The Triton kernels are recorded by the variant each launch would compile on an H100, not run: what the
    engine's warm-up launched must cover every step of a run with varied batches, lengths and chunked prefills."""
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                         architectures=["LlamaForCausalLM"])
    config.to_json_file(tmp_path / "config.json")
    engine = EngineCore(EngineConfig(model=str(tmp_path / "config.json"), load_format="dummy", device="cpu",
                                     dtype="float32", kernel_backend="triton", max_num_batched_tokens=64))
    warm = set(launches)
    assert warm, "the warm-up launched no kernel"
    for i, prompt_len in enumerate([1, 3, 17, 40, 300, 600, 16, 33]):
        params = SamplingParams(n=1 + i % 2, max_tokens=3 + i, ignore_eos=True, temperature=0.7, seed=i)
        engine.add_request(f"r{i}", [(7 * t) % 512 for t in range(prompt_len)], params)
    while engine.has_unfinished_requests():
        engine.step()
    assert launches == warm, f"variants compiled while serving: {launches - warm}"
