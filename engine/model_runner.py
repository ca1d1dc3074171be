"""Runs the model for one scheduled step: SchedulerOutput -> input tensors + AttentionMetadata -> logits
of the rows that sample. Owns the weights and the KV cache."""
from __future__ import annotations

import math
import mmap
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.config import EngineConfig
from engine.device_copy import to_device
from engine.distributed import TPGroup, tensor_parallel
from engine.models import get_model_class
from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from kernels import get_ops
from kernels.decode_attention import MIN_SPLIT_TOKENS

CPU_KV_CACHE_BYTES = 2 << 30
DECODE_GROUPS = 3  # on a one-off CPU timing of 32 decodes of 100-380 tokens, 3 groups beat 1, 2 and 4


class StepInputs(NamedTuple):
    """One step's inputs as host arrays, all a rank needs to run its forward: rank 0 prepares them from the
    SchedulerOutput and broadcasts them to the tensor-parallel workers (engine/executor.py)."""
    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray  # int32 [rows, widest]
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    sample_tokens: np.ndarray
    num_decodes: int
    blocks_to_copy: list[tuple[int, int]]


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, weights, tp: TPGroup = TPGroup()) -> None:
        """weights: an iterator of (name, tensor or safetensors slice) in checkpoint names, or None for random
        (dummy) weights. tp: this rank's tensor-parallel group; the model holds its shard, the KV cache its heads."""
        self.config = config
        self.tp = tp
        self.device = _indexed(torch.device(config.device))
        self.bind_device()
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        with tensor_parallel(tp):
            self.model = _build_model(hf_config, config, weights, self.device, self.dtype)
        attn = self.model.model.layers[0].self_attn
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.kv_caches: list[torch.Tensor] = []

    def shutdown(self) -> None:
        self.kv_caches = []

    def bind_device(self) -> None:
        """Make this runner's GPU the current one of the calling thread (CUDA's current device is per thread):
        Triton launches, memory statistics and new tensors follow it, so cuda:1 must not fall back to cuda:0."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    def determine_num_blocks(self, sampler: Sampler | None) -> int:
        """Blocks of KV cache every rank can hold. sampler: None on the ranks that do not sample."""
        return self.tp.all_min(self._num_blocks(sampler))

    def _num_blocks(self, sampler: Sampler | None) -> int:
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        if self.device.type == "cuda":
            budget = self._profile_cuda_kv_budget(sampler)
        else:
            budget = self.config.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache (budget {budget / 2**20:.0f} MiB); "
                             f"raise gpu_memory_utilization or kv_cache_memory_bytes")
        return int(num_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # Never-written slots must hold zeros, not NaNs: masked keys get zero weight, and 0 * NaN is NaN.
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [_zeros(shape, self.dtype, self.device) for _ in range(self.num_layers)]

    @torch.inference_mode()
    def execute_model(self, output: SchedulerOutput) -> torch.Tensor:
        """fp32 logits [num_sample_rows, vocab_size]."""
        return self.execute_step(self.prepare_step(output))

    @torch.inference_mode()
    def execute_step(self, step: StepInputs) -> torch.Tensor:
        """The forward of a prepared step: what a tensor-parallel worker runs with rank 0's StepInputs. fp32
        logits [num_sample_rows, vocab_size] on the rank that samples, [num_sample_rows, 0] on the others."""
        if step.blocks_to_copy:
            self._copy_blocks(step.blocks_to_copy)
        num_decodes = step.num_decodes
        meta = AttentionMetadata(
            slot_mapping=to_device(step.slot_mapping, self.device, torch.int64),
            block_tables=to_device(step.block_tables, self.device, torch.int32),
            seq_lens=to_device(step.seq_lens, self.device, torch.int32),
            query_start_loc=to_device(step.query_start_loc, self.device, torch.int32),
            num_decodes=num_decodes,
            num_prefill_tokens=int(step.query_start_loc[-1] - num_decodes),
            decode_groups=self._decode_groups(step.seq_lens[:num_decodes]),
            max_prefill_seq_len=int(step.seq_lens[num_decodes:].max(initial=0)),
        )
        input_ids = to_device(step.token_ids, self.device, torch.int64)
        positions = to_device(step.positions, self.device, torch.int64)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden[to_device(step.sample_tokens, self.device, torch.int64)]).float()

    def prepare_step(self, output: SchedulerOutput) -> StepInputs:
        """The step's host arrays: decodes first, then prefill chunks. sample_tokens indexes the token whose
        hidden state each sample row reads (the last scheduled token of its request)."""
        requests = output.requests
        num_new = np.asarray(output.num_scheduled_tokens, dtype=np.int64)
        seq_lens = np.array([r.num_computed_tokens for r in requests], dtype=np.int64) + num_new
        batch_order = np.lexsort((-seq_lens, num_new != 1))  # decodes first, longest first
        order = np.empty_like(batch_order)
        order[batch_order] = np.arange(len(batch_order))
        num_new, seq_lens = num_new[batch_order], seq_lens[batch_order]
        starts = seq_lens - num_new
        query_start_loc = np.zeros(len(num_new) + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start_loc[1:])
        token_ids = np.concatenate([requests[i].all_token_ids[s:e] for i, s, e in zip(batch_order, starts, seq_lens)])
        row_of_token = np.repeat(np.arange(len(num_new)), num_new)
        positions = np.arange(query_start_loc[-1]) - query_start_loc[row_of_token] + starts[row_of_token]
        block_tables = _block_table([requests[i].block_ids for i in batch_order])
        slot_mapping = block_tables[row_of_token, positions // self.block_size] * self.block_size + positions % self.block_size
        sample_tokens = query_start_loc[1:][order[output.sample_rows]] - 1
        return StepInputs(token_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, sample_tokens,
                          int(np.searchsorted(num_new != 1, True)), output.blocks_to_copy)

    def _decode_groups(self, decode_seq_lens: np.ndarray) -> list[tuple[int, int, int]]:
        """Split the (longest first) decodes into equal-count groups; each pads only to its own longest."""
        num_groups = DECODE_GROUPS if self.config.kernel_backend == "torch" else 1
        bounds = np.linspace(0, len(decode_seq_lens), min(num_groups, len(decode_seq_lens)) + 1).astype(int)
        return [(int(s), int(e), int(decode_seq_lens[s])) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]

    def warm_up(self) -> None:
        """Compile every Triton kernel variant serving will use, before serving: a compile takes seconds on a
        GPU and would stall every request of its step. The kernels specialize only on the model and the dtype,
        and decode on whether it splits the context, so two steps cover all: decodes with short contexts
        beside a prefill chunk, then one decode long enough to split. Their KV goes to blocks that requests
        overwrite before they read them."""
        if self.config.kernel_backend != "triton":
            return  # the torch path compiles nothing
        # A context the engine can never hold needs no variant: skip the steps that do not fit.
        num_blocks = self.kv_caches[0].shape[1]
        longest = min(2 * MIN_SPLIT_TOKENS, self.config.max_model_len, num_blocks * self.block_size)
        steps = [([20, 9], [5]), ([longest], [])] if longest > MIN_SPLIT_TOKENS else [([20, 9], [5])]
        for decode_lens, prefill_lens in steps:
            lens = decode_lens + prefill_lens
            blocks = np.cumsum([0] + [-(-n // self.block_size) for n in lens])
            if blocks[-1] > num_blocks:
                continue
            requests = [_dummy_request(i, n, SamplingParams(), range(blocks[i], blocks[i + 1]))
                        for i, n in enumerate(lens)]
            for request in requests[:len(decode_lens)]:
                request.num_computed_tokens = request.num_tokens - 1
            self.execute_model(SchedulerOutput(requests, [1] * len(decode_lens) + prefill_lens, [], [], [], 0))

    def _copy_blocks(self, blocks_to_copy: list[tuple[int, int]]) -> None:
        src, dst = (torch.tensor(ids, device=self.device) for ids in zip(*blocks_to_copy))
        for kv_cache in self.kv_caches:
            kv_cache[:, dst] = kv_cache[:, src]

    def _profile_cuda_kv_budget(self, sampler: Sampler | None) -> int:
        """Run the largest step once and give the KV cache what is left of gpu_memory_utilization after
        weights and peak activations."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.profile_run(sampler)
        torch.cuda.synchronize()
        peak_activation = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used = total - free
        return int(total * self.config.gpu_memory_utilization - used - peak_activation)

    def profile_run(self, sampler: Sampler | None) -> None:
        """The step that needs the most memory besides the KV cache: max_num_batched_tokens of prefill, then
        max_num_seqs rows sampled with every costly setting (top-p over the whole vocabulary, penalty state,
        seeded streams, logprobs), all on a throwaway cache."""
        num_tokens, max_num_seqs = self.config.max_num_batched_tokens, self.config.max_num_seqs
        seq_len = min(num_tokens, self.config.max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        self.allocate_kv_cache(num_seqs * blocks_per_seq)
        # top_p without top_k samples over the whole vocabulary: the sampler's largest temporaries.
        heavy = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.1, logprobs=20,
                               seed=0)
        prompts = [_dummy_request(i, seq_len, heavy, range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
                   for i in range(num_seqs)]
        rows = [_dummy_request(num_seqs + i, seq_len, heavy, []) for i in range(max_num_seqs)]  # all read row 0
        logits = self.execute_model(SchedulerOutput(prompts, [seq_len] * num_seqs, rows, [0] * max_num_seqs, [], 0))
        if sampler is not None:
            sampler(logits, rows)


def _dummy_request(index: int, num_tokens: int, params: SamplingParams, block_ids: Iterable[int]) -> Request:
    request = Request(f"profile-{index}", f"profile-{index}", 0, [0] * num_tokens, params, 1)
    request.block_ids = list(block_ids)
    return request


def _indexed(device: torch.device) -> torch.device:
    """"cuda" as the device it means now, "cuda:N", so that the engine thread can be bound to it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """On the CPU, an anonymous mapping: zero pages by definition, faulted in only as the cache fills,
    so start-up does not pay for touching the whole budget (seconds for gigabytes)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def _block_table(block_ids: list[list[int]]) -> np.ndarray:
    width = max(len(ids) for ids in block_ids)
    table = np.zeros((len(block_ids), width), dtype=np.int32)
    for row, ids in enumerate(block_ids):
        table[row, :len(ids)] = ids
    return table


def _build_model(hf_config, config: EngineConfig, weights, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build on the meta device (no init cost), then materialise and fill with the checkpoint or random weights."""
    model_class = get_model_class(getattr(hf_config, "architectures", None))
    ops = get_ops(config.kernel_backend)
    with torch.device("meta"):
        model = model_class(hf_config, ops)
    # Cast while still on meta (free), so that memory is allocated once, in the target dtype: materialising
    # fp32 first would peak at twice a bf16 model's weights (32 GB for an 8B model).
    model = model.to(dtype).to_empty(device=device)
    if hf_config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cache = model.make_rope_cache().to(device)
    if weights is None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
        for name, param in model.named_parameters():  # as vLLM's dummy format: small uniform values, norms at one
            if name.endswith("norm.weight"):
                param.data.fill_(1.0)
            else:
                param.data.uniform_(-1e-3, 1e-3, generator=generator)
    else:
        model.load_weights(weights)
    return model.eval()
