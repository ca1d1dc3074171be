"""Runs the model for one scheduled step: SchedulerOutput -> input tensors + AttentionMetadata -> logits
of the rows that sample. Owns the weights and the KV cache."""
from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, capture_sizes
from engine.device_copy import to_device
from engine.distributed import TPGroup, tensor_parallel
from engine.input_batch import InputBatch
from engine.layers.linear import KernelLayoutWeight, dense_layers
from engine.logprobs import PromptLogprobRows, prompt_logprobs
from engine.models import get_model_class
from engine.outputs import Logprob
from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import NewRequestData, SchedulerOutput
from engine.step_buffers import StepBuffers
from kernels import get_ops
from kernels.decode_attention import MIN_SPLIT_TOKENS

logger = logging.getLogger("tokmodel.engine")
CPU_KV_CACHE_BYTES = 2 << 30
DECODE_GROUPS = 3  # on a one-off CPU timing of 32 decodes of 100-380 tokens, 3 groups beat 1, 2 and 4


class ModelRunnerOutput(NamedTuple):
    logits: torch.Tensor  # fp32 [num_sample_rows, vocab]
    prompt_logprobs: list[list[dict[int, Logprob]]]  # per PromptLogprobRows asked: a Logprob dict per target


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
        max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        self.input_batch = InputBatch(config.max_num_seqs, config.max_model_len, max_blocks_per_seq)
        self.buffers = StepBuffers(max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs,
                                   max_blocks_per_seq, self.device)
        self.graphs = DecodeGraphs(capture_sizes(config.max_num_seqs) if self.pads_decodes else [])
        # The last step's sampled ids on the device, and the row of each sequence in them (async scheduling).
        self.prev_sampled_token_ids: torch.Tensor | None = None
        self.prev_sampled_row: dict[str, int] = {}

    @property
    def uses_cuda_graphs(self) -> bool:
        """Graphs need a capturable forward: the Triton kernels (the torch reference syncs to skip padding)."""
        return self.device.type == "cuda" and not self.config.enforce_eager and self.config.kernel_backend == "triton"

    @property
    def pads_decodes(self) -> bool:
        return self.uses_cuda_graphs or self.config.eager_graph_padding

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

    def update_states(self, output: SchedulerOutput) -> None:
        """Bring the persistent batch up to this step: once per scheduled step, before any execute_model of it
        (failure isolation reruns parts of a step, which must not apply its changes twice)."""
        self.input_batch.update(output)

    def set_sampled_token_ids(self, req_ids: list[str], token_ids: torch.Tensor) -> None:
        """The tokens req_ids sampled last step, still on the device (async scheduling): the input of their next
        decode, which the scheduler sends as -1 because it does not know them yet."""
        self.prev_sampled_token_ids = token_ids
        self.prev_sampled_row = dict(zip(req_ids, range(len(req_ids))))

    @torch.inference_mode()
    def execute_model(self, output: SchedulerOutput,
                      prompt_rows: Sequence[PromptLogprobRows] = ()) -> ModelRunnerOutput:
        """fp32 logits [num_sample_rows, vocab_size] of the step, whose sequences update_states has placed, and
        the prompt logprobs of prompt_rows (only those rows go through the lm_head: the other requests' prompts
        cost nothing extra). Tensor-parallel ranks but the first (they do not sample) get [num_sample_rows, 0]
        logits and no prompt logprobs."""
        if output.blocks_to_copy:
            self._copy_blocks(output.blocks_to_copy)
        num_tokens, num_sample_rows, meta, token_starts = self._prepare_inputs(output)
        self._insert_sampled_token_ids(output, token_starts)
        dev = self.buffers.dev
        hidden = self.graphs.replay(meta.num_decodes) if meta.num_prefills == 0 else None
        if hidden is None:
            hidden = self.model(dev.input_ids[:num_tokens], dev.positions[:num_tokens], self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[dev.sample_index[:num_sample_rows]]).float()
        prompt = [prompt_logprobs(hidden[token_starts[r.row] + r.start:token_starts[r.row] + r.stop],
                                  self.model.compute_logits, r.target_ids, r.num_top) for r in prompt_rows]
        return ModelRunnerOutput(logits, prompt)

    def _prepare_inputs(self, output: SchedulerOutput) -> tuple[int, int, AttentionMetadata, np.ndarray]:
        """Fill the step buffers from the persistent batch and copy them to the device. The step holds decodes
        first (longest first on the torch path, whose decode groups pad to their longest), then prefill chunks;
        a decode-only step is padded to the next captured size when graphs run (or are mimicked). Returns the
        number of tokens, of sampled rows, the attention metadata, and where each scheduled sequence's tokens
        start in the step."""
        batch, buf = self.input_batch, self.buffers.np
        num_new = np.asarray(output.num_scheduled_tokens, dtype=np.int64)
        is_prefill = num_new != 1
        seq_lens = np.asarray(output.num_computed_tokens, dtype=np.int64) + num_new
        if self.config.kernel_backend == "torch":  # decode groups pad to their longest: sort by length
            batch_order = np.lexsort((-seq_lens, is_prefill))
        else:
            batch_order = np.argsort(is_prefill, kind="stable")
        num_reqs, num_decodes = len(num_new), int(np.count_nonzero(~is_prefill))
        padded = self.graphs.padded_size(num_reqs) if num_decodes == num_reqs else num_reqs
        rows = batch.rows(output.req_ids)[batch_order]
        num_new, seq_lens = num_new[batch_order], seq_lens[batch_order]
        self.buffers.wait_for_copy()
        query_start_loc = buf.query_start_loc[:padded + 1]
        query_start_loc[0] = 0
        np.cumsum(num_new, out=query_start_loc[1:num_reqs + 1])
        num_tokens = int(query_start_loc[num_reqs])
        row_of_token = np.repeat(np.arange(num_reqs), num_new)
        positions = np.arange(num_tokens) - query_start_loc[row_of_token] + (seq_lens - num_new)[row_of_token]
        width = int(-(-seq_lens.max() // self.block_size))
        buf.block_tables[:num_reqs, :width] = batch.block_table[rows, :width]
        buf.positions[:num_tokens] = positions
        buf.input_ids[:num_tokens] = batch.token_ids.reshape(-1)[rows[row_of_token] * batch.max_model_len + positions]
        buf.slot_mapping[:num_tokens] = (buf.block_tables[row_of_token, positions // self.block_size] * self.block_size
                                         + positions % self.block_size)
        buf.seq_lens[:num_reqs] = seq_lens
        num_padding = padded - num_reqs
        if num_padding:
            self._pad_decodes(num_reqs, num_padding)
        order = np.empty_like(batch_order)
        order[batch_order] = np.arange(num_reqs)
        num_sample_rows = len(output.sample_rows)
        buf.sample_index[:num_sample_rows] = query_start_loc[1:][order[output.sample_rows]] - 1
        self.buffers.copy_to_device(padded)
        dev = self.buffers.dev
        meta = AttentionMetadata(
            slot_mapping=dev.slot_mapping[:num_tokens + num_padding],
            block_tables=dev.block_tables[:padded],
            seq_lens=dev.seq_lens[:padded],
            query_start_loc=dev.query_start_loc[:padded + 1],
            num_decodes=num_decodes + num_padding,
            num_prefill_tokens=num_tokens - num_decodes,
            decode_groups=self._decode_groups(buf.seq_lens[:num_decodes + num_padding]),
            max_prefill_seq_len=int(seq_lens[num_decodes:].max(initial=0)),
        )
        return num_tokens + num_padding, num_sample_rows, meta, query_start_loc[:num_reqs][order]

    def _insert_sampled_token_ids(self, output: SchedulerOutput, token_starts: np.ndarray) -> None:
        """Write the last step's sampled ids into the device inputs of the sequences whose last token the
        scheduler sent as -1: one gather and one scatter on the device, no round trip through the host."""
        rows = np.flatnonzero(np.asarray(output.last_token_ids) < 0)
        if not rows.size:
            return
        assert self.prev_sampled_token_ids is not None, "a placeholder token, but no step sampled before"
        src = [self.prev_sampled_row[output.req_ids[row]] for row in rows]
        dst = token_starts[rows] + np.asarray(output.num_scheduled_tokens)[rows] - 1
        index = to_device(np.stack([src, dst]), self.device, torch.int64)
        self.buffers.dev.input_ids[index[1]] = self.prev_sampled_token_ids[index[0]]

    def _pad_decodes(self, num_reqs: int, num_padding: int) -> None:
        """Padding rows after a decode-only step's num_reqs rows: one token at position 0, written nowhere (slot
        -1), attending one cached key (seq_len 1; its block-table row holds valid ids, so the key is finite)."""
        buf, padded = self.buffers.np, num_reqs + num_padding
        buf.query_start_loc[num_reqs + 1:padded + 1] = buf.query_start_loc[num_reqs] + np.arange(1, num_padding + 1)
        buf.input_ids[num_reqs:padded] = 0
        buf.positions[num_reqs:padded] = 0
        buf.slot_mapping[num_reqs:padded] = -1
        buf.seq_lens[num_reqs:padded] = 1

    def _decode_groups(self, decode_seq_lens: np.ndarray) -> list[tuple[int, int, int]]:
        """Split the decodes (longest first on the torch path) into equal-count groups; each pads only to its own
        longest. The Triton and C kernels read each sequence's own length: one group (the longest sets Triton's
        splits)."""
        num_groups = DECODE_GROUPS if self.config.kernel_backend == "torch" else 1
        bounds = np.linspace(0, len(decode_seq_lens), min(num_groups, len(decode_seq_lens)) + 1).astype(int)
        return [(int(s), int(e), int(decode_seq_lens[s:e].max())) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]

    def warm_up(self) -> None:
        """Compile every Triton kernel variant serving will use, before serving: a compile takes seconds on a
        GPU and would stall every request of its step. The kernels specialize only on the model and the dtype,
        and decode on whether it splits the context, so two steps cover all: decodes with short contexts
        beside a prefill chunk, then one decode long enough to split. Their KV goes to blocks that requests
        overwrite before they read them."""
        if self.config.kernel_backend != "triton":
            return  # the torch path compiles nothing
        self._tune_linear()
        # A context the engine can never hold needs no variant: skip the steps that do not fit.
        num_blocks = self.kv_caches[0].shape[1]
        longest = min(2 * MIN_SPLIT_TOKENS, self.config.max_model_len, num_blocks * self.block_size)
        steps = [([20, 9], [5]), ([longest], [])] if longest > MIN_SPLIT_TOKENS else [([20, 9], [5])]
        for decode_lens, prefill_lens in steps:
            lens = decode_lens + prefill_lens
            if sum(-(-n // self.block_size) for n in lens) <= num_blocks:
                self._dummy_step(lens, [1] * len(decode_lens) + prefill_lens, [])

    def _tune_linear(self) -> None:
        """Time the dense layers' matmuls at decode batches, cuBLAS against kernels/gemv.py (kernels.gemv.tune), so
        that the decode graphs captured next run the faster on this GPU. Eager steps always run cuBLAS."""
        if not self.uses_cuda_graphs:
            return
        try:
            measured = get_ops(self.config.kernel_backend).tune_linear(dense_layers(self.model))
        except Exception:  # cuBLAS everywhere beats not serving; the layers tuned before the failure keep their choice
            logger.exception("timing the decode matmuls failed: the rest stay cuBLAS's")
            return
        for row in measured:
            faster = "gemv" if row["chosen"] else "cuBLAS"
            gemv_us = "no config matched" if row["gemv_us"] is None else f"gemv {row['gemv_us']:.1f} us"
            logger.info("decode matmul %dx%d at %d rows: cuBLAS %.1f us, %s: %s", row["n"], row["k"], row["rows"],
                        row["cublas_us"], gemv_us, faster)

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Capture the decode forward for every padded size, largest first, on the step buffers: rows of one
        token at position 0, written nowhere. The split count of decode attention is chosen for the longest
        context, so it is fixed per size; splits past a shorter context are empty and weigh nothing."""
        if not self.uses_cuda_graphs:
            return
        try:
            for size in reversed(self.graphs.sizes):
                self._capture(size)
        except Exception:  # serving eagerly beats not serving; the GPU check's fast_path step reports it
            logger.exception("capturing CUDA graphs failed: decode runs eagerly (as with enforce_eager)")
            self.graphs = DecodeGraphs([])

    def _capture(self, size: int) -> None:
        buf, dev = self.buffers.np, self.buffers.dev
        buf.input_ids[:size], buf.positions[:size], buf.slot_mapping[:size] = 0, 0, -1
        buf.seq_lens[:size], buf.block_tables[:size] = 1, 0
        buf.query_start_loc[:size + 1] = np.arange(size + 1)
        self.buffers.copy_to_device(size)
        meta = AttentionMetadata(dev.slot_mapping[:size], dev.block_tables[:size], dev.seq_lens[:size],
                                 dev.query_start_loc[:size + 1], num_decodes=size, num_prefill_tokens=0,
                                 decode_groups=[(0, size, self.config.max_model_len)], max_prefill_seq_len=0)
        self.graphs.capture(size, lambda: self.model(dev.input_ids[:size], dev.positions[:size], self.kv_caches, meta))

    def _dummy_step(self, seq_lens: list[int], num_new: list[int], sample_rows: list[int]) -> torch.Tensor:
        """Run sequences of seq_lens tokens (zeros) computing their last num_new, each on its own blocks from
        block 0, through the persistent batch; they leave it afterwards."""
        blocks = np.cumsum([0] + [-(-n // self.block_size) for n in seq_lens])
        req_ids = [f"dummy-{i}" for i in range(len(seq_lens))]
        new_reqs = [NewRequestData(req_id, [0] * n, list(range(blocks[i], blocks[i + 1])))
                    for i, (req_id, n) in enumerate(zip(req_ids, seq_lens))]
        output = SchedulerOutput(req_ids, num_new, [n - k for n, k in zip(seq_lens, num_new)], [0] * len(req_ids),
                                 new_reqs, [], [], [req_ids[row] for row in sample_rows], sample_rows, [], [])
        self.update_states(output)
        try:
            return self.execute_model(output).logits
        finally:
            for req_id in req_ids:
                self.input_batch.remove(req_id)

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
        num_seqs = min(-(-num_tokens // seq_len), max_num_seqs)  # the scheduler runs no more sequences
        self.allocate_kv_cache(num_seqs * -(-seq_len // self.block_size))
        # top_p without top_k samples over the whole vocabulary: the sampler's largest temporaries.
        heavy = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.1, logprobs=20,
                               seed=0)
        rows = [_dummy_request(i, seq_len, heavy) for i in range(max_num_seqs)]  # all read row 0
        logits = self._dummy_step([seq_len] * num_seqs, [seq_len] * num_seqs, [0] * max_num_seqs)
        if sampler is not None:
            sampler(logits, rows)


def _dummy_request(index: int, num_tokens: int, params: SamplingParams) -> Request:
    return Request(f"profile-{index}", f"profile-{index}", 0, [0] * num_tokens, params, 1)


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
    for module in model.modules():
        if isinstance(module, KernelLayoutWeight):
            module.process_weights_after_loading()
    if hf_config.tie_word_embeddings:  # tied again to the head's weight as laid out: one copy, read by ops.embedding
        model.model.embed_tokens.weight = model.lm_head.weight
    return model.eval()
