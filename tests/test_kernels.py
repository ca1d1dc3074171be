"""Every Triton kernel against its PyTorch reference (kernels/reference.py).

Without CUDA the kernels run in Triton's interpreter on small shapes in fp32 (tight tolerances; fp16 too for
the elementwise kernels, whose rounding the interpreter reproduces exactly; it rounds bf16 by truncation, so
bf16 is checked on GPUs only). With CUDA the same tests run with longer contexts in fp32, bf16 and fp16.
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from types import ModuleType
from typing import TYPE_CHECKING, Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from benchmarks import kernels as bench
from kernels import KernelOps, get_ops
from kernels import reference as ref
from kernels import compile_count, cpu_ops, decode_attention, gemv, triton_ops
from kernels.decode_attention import choose_num_splits, decode_with_splits
from kernels.fused_moe import moe_align_block_size
from tests.kernel_launches import launches  # noqa: F401 (fixture)

if TYPE_CHECKING:
    from _pytest.mark.structures import ParameterSet

HAS_CUDA = torch.cuda.is_available()


class Target(NamedTuple):
    device: str
    dtype: torch.dtype
    atol: float
    rtol: float
    scale: int  # contexts and chunks grow by this factor on a GPU


def _target(device: str, dtype: torch.dtype, tol: float, scale: int) -> ParameterSet:
    # With CUDA present Triton compiles for the GPU, so CPU tensors cannot reach a kernel (and vice versa).
    reason = "needs CUDA" if device == "cuda" else "with CUDA present Triton runs on the GPU, not the interpreter"
    skip = pytest.mark.skipif(HAS_CUDA != (device == "cuda"), reason=reason)
    return pytest.param(Target(device, dtype, tol, tol, scale), id=f"{device}-{str(dtype)[6:]}", marks=skip)


# Tolerances: fp32 differs from the reference only in summation order; 16-bit outputs may differ by a rounding
# step of the output (bf16: 2^-8 relative, fp16: 2^-11) on top of the reference's own 16-bit softmax rounding.
ATTENTION_TARGETS = [
    _target("cpu", torch.float32, 1e-5, 1),
    _target("cuda", torch.float32, 1e-4, 4),
    _target("cuda", torch.bfloat16, 2e-2, 8),
    _target("cuda", torch.float16, 4e-3, 8),
]
ELEMENTWISE_TARGETS = ATTENTION_TARGETS + [_target("cpu", torch.float16, 1e-3, 1)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _grow(n: int, target: Target) -> int:
    """Scale a length up for a GPU run, keeping 0 and 1 (empty prefixes, decodes) and off block multiples."""
    return n if n <= 1 else n * target.scale + target.scale - 1


class PagedCache(NamedTuple):
    kv_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor


def _paged_cache(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                 target: Target) -> PagedCache:
    """A random cache whose sequences own blocks in shuffled order, with spare blocks no table points to."""
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=target.device).to(target.dtype)
    order = torch.randperm(num_blocks, device=target.device).to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, device=target.device)
    for i, table in enumerate(order[:sum(blocks_per_seq)].split(blocks_per_seq)):
        block_tables[i, :len(table)] = table
    return PagedCache(kv_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32, device=target.device))


def _query(num_tokens: int, num_heads: int, head_dim: int, target: Target) -> torch.Tensor:
    return torch.randn(num_tokens, num_heads, head_dim, device=target.device).to(target.dtype)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, target: Target) -> None:
    torch.testing.assert_close(actual, expected, atol=target.atol, rtol=target.rtol)


def _attend(op: Callable[..., None], query: torch.Tensor, *args) -> torch.Tensor:
    """An attention op's output for every row of query (args select them all), written into a new tensor."""
    out = torch.full_like(query, float("nan"))  # a row the op fails to write stays NaN and fails the comparison
    op(query, *args, out=out)
    return out


class AttentionCase(NamedTuple):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    sliding_window: int | None = None
    logits_soft_cap: float | None = None


# Together the cases cover GQA ratios 1, 2, 3, 4, 5, 7, 8, head dims 64, 80, 96, 128, 256 and block sizes 8..128,
# sliding windows, and Gemma 2's soft cap (with a cap of 2 the random scores, ~N(0, 1), are visibly bent).
ATTENTION_CASES = {
    "mha-d64-bs16": AttentionCase(4, 4, 64, 16),
    "gqa3-d80-bs8": AttentionCase(6, 2, 80, 8),
    "gqa4-d128-bs16-window": AttentionCase(8, 2, 128, 16, sliding_window=37),
    "gqa5-d96-bs32": AttentionCase(5, 1, 96, 32),
    "gqa7-d256-bs128": AttentionCase(7, 1, 256, 128),
    "gqa8-d64-bs64-window": AttentionCase(16, 2, 64, 64, sliding_window=100),
    "gqa2-d64-bs16-window-softcap": AttentionCase(4, 2, 64, 16, sliding_window=20, logits_soft_cap=2.0),
}

# Decode contexts: a single token, under one block, block multiples +- 1 and a long context, in one batch.
DECODE_CONTEXTS = [1, 7, 129, 300, 63]


@pytest.mark.parametrize("target", ATTENTION_TARGETS)
@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_decode_attention_matches_reference_on_mixed_contexts(case: AttentionCase, target: Target) -> None:
    lens = [_grow(n, target) for n in DECODE_CONTEXTS]
    cache = _paged_cache(lens, case.block_size, case.num_kv_heads, case.head_dim, target)
    query = _query(len(lens), case.num_heads, case.head_dim, target)
    args = (query, *cache, 0, len(lens), case.head_dim ** -0.5, max(lens), case.sliding_window, case.logits_soft_cap)
    _assert_close(_attend(triton_ops.paged_decode_attention, *args), _attend(ref.paged_decode_attention, *args),
                  target)


# The C kernel (kernel_backend="cpu") on CPU tensors, with or without CUDA: fp32 to summation order, and bf16 to
# a rounding step of the output (the reference rounds its softmax to bf16 too).
CPU_KERNEL_TARGETS = [Target("cpu", torch.float32, 1e-5, 1e-5, 1), Target("cpu", torch.bfloat16, 2e-2, 2e-2, 1)]
needs_cpu_kernels = pytest.mark.skipif(not cpu_ops.available(), reason="no C compiler to build kernels/cpu/")
# The elementwise ops of both: the Triton kernels on ELEMENTWISE_TARGETS, the C kernels on the CPU's targets.
ELEMENTWISE_OPS = ([pytest.param(triton_ops, *target.values, id=f"triton-{target.id}", marks=target.marks)
                    for target in ELEMENTWISE_TARGETS]
                   + [pytest.param(cpu_ops, target, id=f"cpu-{str(target.dtype)[6:]}", marks=needs_cpu_kernels)
                      for target in CPU_KERNEL_TARGETS])


@needs_cpu_kernels
@pytest.mark.parametrize("target", CPU_KERNEL_TARGETS, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_cpu_decode_attention_matches_reference_on_mixed_contexts(case: AttentionCase, target: Target) -> None:
    lens = DECODE_CONTEXTS + [0]  # and an empty row (graph padding may have one): zeros, not NaN
    cache = _paged_cache(lens, case.block_size, case.num_kv_heads, case.head_dim, target)
    # The query is a view into a fused projection, as the model passes it: strided tokens.
    qkv = _query(len(lens), 2 * case.num_heads, case.head_dim, target)
    query = qkv[:, :case.num_heads]
    args = (query, *cache, 0, len(lens) - 1, case.head_dim ** -0.5, max(lens), case.sliding_window,
            case.logits_soft_cap)
    actual = _attend(cpu_ops.paged_decode_attention, *args)
    _assert_close(actual[:-1], _attend(ref.paged_decode_attention, *args)[:-1], target)
    assert actual[-1].isnan().all(), "a row outside seqs was written"
    cpu_ops.paged_decode_attention(query, *cache, len(lens) - 1, len(lens), 1.0, 0, out=actual)
    assert (actual[-1] == 0).all()


@pytest.mark.skipif(not cpu_ops.linear_available(), reason="kernels/cpu/linear.c needs a CPU with AVX-512 BF16")
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 32, 100])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("outputs, inputs", [(64, 600), (96, 2), (32, 70)])
def test_cpu_linear_is_the_exact_product_rounded_once_to_bf16(rows: int, with_bias: bool, outputs: int,
                                                              inputs: int) -> None:
    # Rows past the kernel's 8-row tiles (1-7 left), one or several 32-column blocks; x's rows are a view into
    # wider rows, as the model's activations can be.
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2 * inputs + 100, generator=generator).bfloat16()[:, 100:100 + inputs]
    weight = torch.randn(outputs, inputs, generator=generator).bfloat16()
    bias = torch.randn(outputs, generator=generator).bfloat16() if with_bias else None
    exact = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    packed = cpu_ops.pack_linear_weight(weight)
    assert packed.shape != weight.shape and torch.equal(cpu_ops.unpack_linear_weight(packed), weight)
    actual = cpu_ops.linear(x, packed, bias)
    assert actual.dtype == torch.bfloat16 and actual.shape == (rows, outputs)
    # One bf16 rounding (at most 2^-8 of the value), plus float32 sums in another order than the exact one's.
    tolerance = exact.abs() * 2.0 ** -8 + 1e-5 * (x.double().abs() @ weight.double().abs().T)
    assert ((actual.double() - exact).abs() <= tolerance).all()


def test_cpu_linear_packs_only_what_its_kernel_reads() -> None:
    # Other dtypes and shapes the packing does not divide stay [N, K] and torch's. A packed weight takes
    # leading dims, and an input the kernel does not read (a strided last dim) still gets the product.
    for weight in (torch.randn(64, 64), torch.randn(40, 64).bfloat16(), torch.randn(64, 63).bfloat16()):
        assert cpu_ops.pack_linear_weight(weight) is weight
        x = torch.randn(3, weight.shape[1]).to(weight.dtype)
        assert torch.equal(cpu_ops.linear(x, weight), F.linear(x, weight))
    if not cpu_ops.linear_available():
        return
    weight = torch.randn(64, 64).bfloat16()
    packed = cpu_ops.pack_linear_weight(weight)
    x = torch.randn(2, 3, 64).bfloat16()
    assert torch.equal(cpu_ops.linear(x, packed), cpu_ops.linear(x.view(6, 64), packed).view(2, 3, 64))
    x = torch.randn(3, 128).bfloat16()[:, ::2]
    assert torch.equal(cpu_ops.linear(x, packed), F.linear(x, weight))
    ids = torch.tensor([[0, 31, 32], [63, 1, 33]])
    assert torch.equal(cpu_ops.embedding(ids, packed), F.embedding(ids, weight))


@pytest.mark.parametrize("target", ATTENTION_TARGETS)
@pytest.mark.parametrize("num_splits", [1, 2, 7])
def test_decode_attention_is_independent_of_the_split_count(num_splits: int, target: Target) -> None:
    # One split writes the output from stage 1; 7 splits leave the 5- and 20-token contexts with empty splits,
    # which must weigh nothing in the merge.
    lens = [_grow(n, target) for n in (5, 20, 333)]
    cache = _paged_cache(lens, 16, 2, 64, target)
    query = _query(len(lens), 8, 64, target)
    expected = _attend(ref.paged_decode_attention, query, *cache, 0, len(lens), 0.125, max(lens))
    actual = _attend(functools.partial(decode_with_splits, num_splits=num_splits), query, *cache, 0, len(lens), 0.125,
                     None)
    _assert_close(actual, expected, target)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter only: proves the launch sequence, not a GPU property")
def test_decode_attention_with_one_split_launches_no_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_attention, "_merge_splits_kernel", None)  # launching it would raise
    target = Target("cpu", torch.float32, 1e-5, 1e-5, 1)
    cache = _paged_cache([9, 30], 16, 2, 64, target)
    query = _query(2, 8, 64, target)
    expected = _attend(ref.paged_decode_attention, query, *cache, 0, 2, 0.125, 30)
    _assert_close(_attend(triton_ops.paged_decode_attention, query, *cache, 0, 2, 0.125, 30), expected,
                  target)


def test_long_contexts_of_a_small_batch_are_split_and_large_batches_are_not() -> None:
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    assert choose_num_splits(num_programs=2, max_seq_len=8192, device=device) > 1
    assert choose_num_splits(num_programs=2, max_seq_len=100, device=device) == 1
    assert choose_num_splits(num_programs=100_000, max_seq_len=8192, device=device) == 1


# Prefill batches as (cached prefix length, chunk length): fresh prompts, prefixes ending mid-block and on a
# block boundary, chunks longer than one program's query block, and decodes (chunk of 1) riding along.
PREFILL_BATCHES = {
    "fresh-prompts": [(0, 19), (0, 1), (0, 70)],
    "cached-prefixes-and-decodes": [(45, 30), (200, 1), (16, 17), (0, 3), (7, 1)],
    "long-chunk-after-long-prefix": [(130, 90)],
}


@pytest.mark.parametrize("target", ATTENTION_TARGETS)
@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
@pytest.mark.parametrize("batch", PREFILL_BATCHES.values(), ids=PREFILL_BATCHES.keys())
def test_prefill_attention_matches_reference_with_cached_prefixes(batch: list[tuple[int, int]], case: AttentionCase,
                                                                  target: Target) -> None:
    chunks = [(_grow(prefix, target), _grow(q_len, target)) for prefix, q_len in batch]
    lens = [prefix + q_len for prefix, q_len in chunks]
    cache = _paged_cache(lens, case.block_size, case.num_kv_heads, case.head_dim, target)
    q_lens = torch.tensor([0] + [q_len for _, q_len in chunks], device=target.device)
    query_start_loc = q_lens.cumsum(0).to(torch.int32)
    query = _query(int(q_lens.sum()), case.num_heads, case.head_dim, target)
    args = (query, *cache, query_start_loc, 0, len(lens), case.head_dim ** -0.5, max(lens), case.sliding_window,
            case.logits_soft_cap)
    _assert_close(_attend(triton_ops.prefill_attention, *args), _attend(ref.prefill_attention, *args), target)


# A batch as the runner orders it: decodes first, then prefill chunks (cached prefix length, chunk length).
MIXED_BATCH = [(40, 1), (7, 1), (129, 1), (45, 30), (0, 19), (16, 17)]


@pytest.mark.parametrize("target", ATTENTION_TARGETS)
@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cpu", marks=needs_cpu_kernels)])
def test_attention_ops_read_whole_tables_and_write_their_rows_of_a_larger_out(backend: str, target: Target) -> None:
    if backend == "cpu" and target.device != "cpu":
        pytest.skip("the C kernels take CPU tensors")
    ops, scale = get_ops(backend), 0.125
    chunks = [(_grow(prefix, target), _grow(q_len, target)) for prefix, q_len in MIXED_BATCH]
    lens = [prefix + q_len for prefix, q_len in chunks]
    num_decodes = 3
    decode_groups = [(0, 1), (1, num_decodes)]  # the second starts at an offset, as the torch path's groups do
    cache = _paged_cache(lens, 16, 2, 64, target)
    query_start_loc = torch.tensor([0] + [q_len for _, q_len in chunks], device=target.device).cumsum(0).to(torch.int32)
    num_tokens = int(query_start_loc[-1])
    query = _query(num_tokens, 8, 64, target)
    # out is a slice of a larger buffer whose margins no op may touch.
    buffer = torch.full((num_tokens + 2, 8, 64), float("nan"), dtype=target.dtype, device=target.device)
    out = buffer[1:-1]
    ops.prefill_attention(query, *cache, query_start_loc, num_decodes, len(lens), scale, max(lens), out=out)
    assert out[:num_decodes].isnan().all(), "prefill wrote the decodes' rows"
    for first, end in decode_groups:
        ops.paged_decode_attention(query, *cache, first, end, scale, max(lens[first:end]), out=out)
    assert buffer[0].isnan().all() and buffer[-1].isnan().all(), "an op wrote outside out"

    # Expected: the reference on the sliced batch, as the ops were called before they took whole tables.
    expected = torch.empty_like(query)
    for first, end in decode_groups:
        ref.paged_decode_attention(query[first:end], cache.kv_cache, cache.block_tables[first:end],
                                   cache.seq_lens[first:end], 0, end - first, scale, max(lens[first:end]),
                                   out=expected[first:end])
    ref.prefill_attention(query[num_decodes:], cache.kv_cache, cache.block_tables[num_decodes:],
                          cache.seq_lens[num_decodes:], query_start_loc[num_decodes:] - num_decodes, 0,
                          len(lens) - num_decodes, scale, max(lens), out=expected[num_decodes:])
    _assert_close(out, expected, target)


@pytest.mark.parametrize("ops, target", ELEMENTWISE_OPS)
@pytest.mark.parametrize("weight_offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(with_residual: bool, weight_offset: float, ops: ModuleType,
                                    target: Target) -> None:
    hidden = 96 * target.scale  # not a power of two: the tail of the row is masked
    x = torch.randn(3, 5, hidden, device=target.device).to(target.dtype)
    weight = torch.randn(hidden, device=target.device).to(target.dtype)
    residual = torch.randn_like(x) if with_residual else None
    actual = ops.rms_norm(x, weight, 1e-6, residual, weight_offset)
    expected = ref.rms_norm(x, weight, 1e-6, residual, weight_offset)
    if with_residual:
        _assert_close(actual[1], expected[1], target)
        actual, expected = actual[0], expected[0]
    _assert_close(actual, expected, target)


def _new_tokens(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, num_slots: int,
                target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qkv, positions, slots) of a layer's new tokens: query, key and value are views into one fused projection, as
    the model hands them over; every fourth token is padding (slot -1)."""
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=target.device).to(target.dtype)
    positions = torch.randint(0, 64, (num_tokens,), device=target.device)
    slots = torch.randperm(num_slots, device=target.device)[:num_tokens]
    slots[::4] = -1
    return qkv, positions, slots


# Each case is a compile per dtype on a GPU: every rotation without a norm; with Qwen3's and Gemma 3's norms, the
# models' full rotary (Qwen3 neox, Gemma's weight offset on GPT-J pairs) and one partial (norm, then rotation).
ROTARY_CASES = [pytest.param(is_neox, rotary_dim, None, id=f"{'neox' if is_neox else 'gptj'}-{name}")
                for is_neox in (True, False) for rotary_dim, name in ((128, "full"), (64, "partial"))] + [
    pytest.param(True, 128, 0.0, id="neox-full-qk-norm"), pytest.param(False, 128, 1.0, id="gptj-full-gemma-qk-norm"),
    pytest.param(True, 64, 0.0, id="neox-partial-qk-norm")]


@pytest.mark.parametrize("ops, target", ELEMENTWISE_OPS)
@pytest.mark.parametrize("is_neox, rotary_dim, norm_offset", ROTARY_CASES)
def test_rotary_embedding_and_write_kv_rotates_query_in_place_and_writes_rotated_key_and_value_to_their_slots(
        norm_offset: float | None, rotary_dim: int, is_neox: bool, ops: ModuleType, target: Target) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim, num_blocks, block_size = 6 * target.scale, 8, 2, 128, 6, 8
    qkv, positions, slots = _new_tokens(num_tokens, num_heads, num_kv_heads, head_dim, num_blocks * block_size,
                                        target)
    query, key, value = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, -num_kv_heads:]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=target.device).to(target.dtype)
    cos_sin_cache = torch.randn(64, rotary_dim, device=target.device)
    # Qwen3's and Gemma 3's per-head norms of query and key, before the rotation
    norm = {} if norm_offset is None else {
        "q_norm_weight": torch.randn(head_dim, device=target.device).to(target.dtype),
        "k_norm_weight": torch.randn(head_dim, device=target.device).to(target.dtype), "norm_eps": 1e-6,
        "norm_weight_offset": norm_offset}
    expected_qkv, expected_cache = qkv.clone(), cache.clone()
    ops.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin_cache, cache, slots, is_neox, **norm)
    ref.rotary_embedding_and_write_kv(positions, expected_qkv[:, :num_heads],
                                      expected_qkv[:, num_heads:num_heads + num_kv_heads],
                                      expected_qkv[:, -num_kv_heads:], cos_sin_cache, expected_cache, slots, is_neox,
                                      **norm)
    if norm:  # the norm's sum of squares adds up in another order: a 16-bit rounding may land one step away
        target = target._replace(atol=2 * target.atol, rtol=2 * target.rtol)
    _assert_close(qkv, expected_qkv, target)  # the query (normalised and) rotated; key and value untouched
    _assert_close(cache, expected_cache, target)  # padding's slots, and every slot not written, as they were
    written = cache.view(2, -1, num_kv_heads, head_dim)[:, slots[slots >= 0]]
    assert not torch.equal(written[0], key[slots >= 0].to(cache.dtype)), "the key went in unrotated"


@pytest.mark.parametrize("target", ELEMENTWISE_TARGETS)
def test_triton_rotary_embedding_and_write_kv_casts_into_a_narrower_cache_at_any_head_dim(target: Target) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim, num_blocks, block_size = 5 * target.scale, 4, 3, 80, 6, 8
    # fp32 projections into the target's cache, head dim 80: the tail of each head row is masked
    qkv, positions, slots = _new_tokens(num_tokens, num_heads, num_kv_heads, head_dim, num_blocks * block_size,
                                        target._replace(dtype=torch.float32))
    query, key, value = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, -num_kv_heads:]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=target.device).to(target.dtype)
    cos_sin_cache = torch.randn(64, 48, device=target.device)  # partial: 48 of 80 dims rotate
    expected_query, expected_cache = query.clone(), cache.clone()
    triton_ops.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin_cache, cache, slots)
    ref.rotary_embedding_and_write_kv(positions, expected_query, key, value, cos_sin_cache, expected_cache, slots)
    _assert_close(query, expected_query, target._replace(atol=1e-5, rtol=1e-5))
    _assert_close(cache, expected_cache, target)


@pytest.mark.parametrize("target", ELEMENTWISE_TARGETS)
@pytest.mark.parametrize("norm_offset", [0.0, 1.0], ids=["qwen3", "gemma"])
def test_triton_qk_norm_in_the_rotary_kernel_rounds_as_the_norm_kernel_then_the_rotation(norm_offset: float,
                                                                                        target: Target) -> None:
    # Head dim 96 and 6 query heads over 3: masked lanes and heads beside the norm's sums.
    num_tokens, num_heads, num_kv_heads, head_dim, num_blocks, block_size = 5 * target.scale, 6, 3, 96, 6, 8
    qkv, positions, slots = _new_tokens(num_tokens, num_heads, num_kv_heads, head_dim, num_blocks * block_size,
                                        target)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=target.device).to(target.dtype)
    cos_sin_cache = torch.randn(64, head_dim, device=target.device)
    q_weight, k_weight = (torch.randn(head_dim, device=target.device).to(target.dtype) for _ in range(2))
    expected_qkv, expected_cache = qkv.clone(), cache.clone()
    query, key, value = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, -num_kv_heads:]
    triton_ops.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin_cache, cache, slots, True,
                                             q_weight, k_weight, 1e-6, norm_offset)
    # The same as the norm kernel, then the op without a norm: each rounding where it rounds, bit for bit in fp16
    # in the interpreter (fp32 keeps the sums' order, in the last bits; a GPU may round one step away).
    expected_query = expected_qkv[:, :num_heads]
    expected_query.copy_(triton_ops.rms_norm(expected_query, q_weight, 1e-6, None, norm_offset))
    normed_key = triton_ops.rms_norm(expected_qkv[:, num_heads:num_heads + num_kv_heads], k_weight, 1e-6, None,
                                     norm_offset)
    triton_ops.rotary_embedding_and_write_kv(positions, expected_query, normed_key, expected_qkv[:, -num_kv_heads:],
                                             cos_sin_cache, expected_cache, slots, True)
    exact = target.device == "cpu" and target.dtype == torch.float16
    _assert_close(qkv, expected_qkv, target._replace(atol=0.0, rtol=0.0) if exact else target)
    _assert_close(cache, expected_cache, target._replace(atol=0.0, rtol=0.0) if exact else target)


@needs_cpu_kernels
@pytest.mark.parametrize("target", CPU_KERNEL_TARGETS, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [16, 8], ids=["full", "partial"])
def test_cpu_rotary_embedding_and_write_kv_matches_the_reference_exactly_and_refuses_what_is_out_of_range(
        rotary_dim: int, is_neox: bool, target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim, num_blocks, block_size = 10, 4, 3, 16, 6, 8
    qkv, positions, slots = _new_tokens(num_tokens, num_heads, num_kv_heads, head_dim, num_blocks * block_size,
                                        target)
    query, key, value = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, -num_kv_heads:]
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(target.dtype)
    cos_sin_cache = torch.randn(64, rotary_dim)
    expected_qkv, expected_cache = qkv.clone(), cache.clone()
    ref.rotary_embedding_and_write_kv(positions, expected_qkv[:, :num_heads],
                                      expected_qkv[:, num_heads:num_heads + num_kv_heads],
                                      expected_qkv[:, -num_kv_heads:], cos_sin_cache, expected_cache, slots, is_neox)
    # The views the model passes reach the C kernel, not the reference it falls back to.
    monkeypatch.setattr(cpu_ops.reference, "rotary_embedding_and_write_kv", None)
    cpu_ops.rotary_embedding_and_write_kv(positions, query, key, value, cos_sin_cache, cache, slots, is_neox)
    # bf16 too: the C kernel rounds where the reference's ops do.
    assert torch.equal(qkv, expected_qkv) and torch.equal(cache, expected_cache)
    for bad_slots, bad_positions, what in ((torch.full_like(slots, num_blocks * block_size), positions, "slot"),
                                           (slots, torch.full_like(positions, 64), "position")):
        with pytest.raises(IndexError, match=what):
            cpu_ops.rotary_embedding_and_write_kv(bad_positions, query, key, value, cos_sin_cache, cache, bad_slots,
                                                  is_neox)
    assert torch.equal(qkv, expected_qkv) and torch.equal(cache, expected_cache), "a refused write wrote"


@pytest.mark.parametrize("ops, target", ELEMENTWISE_OPS)
def test_rms_norm_of_heads_cut_from_a_fused_projection_reads_them_where_they_are(ops: ModuleType,
                                                                                 target: Target) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim = 6 * target.scale, 8, 2, 128
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=target.device).to(target.dtype)
    key = qkv[:, num_heads:num_heads + num_kv_heads]  # strided tokens, as Qwen3's k_norm gets them
    weight = torch.randn(head_dim, device=target.device).to(target.dtype)
    _assert_close(ops.rms_norm(key, weight, 1e-6), ref.rms_norm(key.contiguous(), weight, 1e-6), target)


# The CPU backend's activations are the reference's own: the Triton kernels only.
@pytest.mark.parametrize("ops, target", [p for p in ELEMENTWISE_OPS if p.values[0] is triton_ops])
@pytest.mark.parametrize("name", ["silu_and_mul", "gelu_tanh_and_mul"])
def test_gated_activations_match_reference(name: str, ops: ModuleType, target: Target) -> None:
    x = torch.randn(2, 3, 2 * 1100 * target.scale, device=target.device).to(target.dtype)  # d spans column blocks
    _assert_close(getattr(triton_ops, name)(x), getattr(ref, name)(x), target)



class MoeCase(NamedTuple):
    num_experts: int
    top_k: int
    num_tokens: int
    only_experts: tuple[int, ...] = ()  # route every token to these experts only, leaving the others empty


# Expert counts 4..16, top-k 1..6 (up to every expert), single tokens and batches on both sides of the small/large
# block threshold (tokens <= experts); experts without tokens among many, and routing that skips the first and
# last experts.
MOE_CASES = {
    "e4-top1-1tok": MoeCase(4, 1, 1),
    "e8-top2-3tok": MoeCase(8, 2, 3),
    "e8-top2-21tok-large-blocks": MoeCase(8, 2, 21),
    "e16-top4-5tok-mostly-empty": MoeCase(16, 4, 5),
    "e6-top6-every-expert": MoeCase(6, 6, 4),
    "e8-top2-two-experts-only": MoeCase(8, 2, 19, only_experts=(2, 5)),
}
MOE_HIDDEN, MOE_INTERMEDIATE = 72, 40  # neither a multiple of a GEMM block: row and column tails are masked


def _moe_inputs(case: MoeCase, num_tokens: int, target: Target) -> tuple[torch.Tensor, ...]:
    """hidden_states, w13, w2 (scaled so every output is O(1)), fp32 routing weights and distinct expert ids."""
    device, h, i, e = target.device, MOE_HIDDEN, MOE_INTERMEDIATE, case.num_experts
    hidden = torch.randn(num_tokens, h, device=device).to(target.dtype)
    w13 = (torch.randn(e, 2 * i, h, device=device) / h**0.5).to(target.dtype)
    w2 = (torch.randn(e, h, i, device=device) / i**0.5).to(target.dtype)
    scores = torch.rand(num_tokens, e, device=device)
    if case.only_experts:
        scores[:, list(case.only_experts)] += 1.0
    topk_weights, topk_ids = scores.softmax(dim=-1).topk(case.top_k, dim=-1)
    return hidden, w13, w2, topk_weights, topk_ids


@pytest.mark.parametrize("target", ATTENTION_TARGETS)
@pytest.mark.parametrize("case", MOE_CASES.values(), ids=MOE_CASES.keys())
def test_fused_moe_matches_reference(case: MoeCase, target: Target) -> None:
    inputs = _moe_inputs(case, _grow(case.num_tokens, target), target)
    if case.only_experts:
        assert set(inputs[-1].unique().tolist()) == set(case.only_experts)
    _assert_close(triton_ops.fused_moe(*inputs), ref.fused_moe(*inputs), target)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(("num_experts", "num_tokens"), [(7, 10), (100, 150)], ids=["one-chunk", "several-chunks"])
def test_moe_align_block_size_gives_each_block_one_experts_pairs(num_experts: int, num_tokens: int,
                                                                 block_size: int) -> None:
    top_k = 3
    device = "cuda" if HAS_CUDA else "cpu"
    topk_ids = torch.rand(num_tokens, num_experts, device=device).topk(top_k, dim=-1).indices
    topk_ids[topk_ids == 3] = 4  # expert 3 gets no token
    sorted_ids, expert_ids, num_post_padded = moe_align_block_size(topk_ids, block_size, num_experts)
    num_pairs, padded = topk_ids.numel(), int(num_post_padded)
    counts = torch.bincount(topk_ids.flatten(), minlength=num_experts)
    assert counts[3] == 0
    assert padded == int(((counts + block_size - 1) // block_size * block_size).sum())
    placed = sorted_ids[:padded].long()
    valid = placed[placed < num_pairs]
    assert (placed[placed >= num_pairs] == num_pairs).all(), "padding holds num_pairs"
    assert sorted(valid.tolist()) == list(range(num_pairs)), "every (token, k) pair appears once"
    by_expert = topk_ids.flatten()[valid]
    assert (valid.diff()[by_expert[1:] == by_expert[:-1]] > 0).all(), "pairs in order within an expert"
    for block in range(padded // block_size):
        pairs = sorted_ids[block * block_size:(block + 1) * block_size].long()
        pairs = pairs[pairs < num_pairs]
        assert len(pairs) > 0, "a block of padding only"
        assert (topk_ids.flatten()[pairs] == expert_ids[block]).all()


@pytest.mark.skipif(HAS_CUDA, reason="interpreter only: counts the variants an H100 would compile")
def test_fused_moe_launches_one_variant_per_gemm_and_block_config(launches: set[tuple]) -> None:
    case = MoeCase(8, 2, 0)
    target = Target("cpu", torch.float32, 0.0, 0.0, 1)
    for num_tokens in (1, 2, 7, 8, 9, 33, 100):  # up to 8 tokens: small blocks; more: large
        triton_ops.fused_moe(*_moe_inputs(case, num_tokens, target))
    # gate_up and down, each with small and large blocks; one SiLU-and-mul.
    # The alignment: its count, and its placement per block size.
    assert Counter(name for name, *_ in launches) == {"_count_experts_kernel": 1, "_align_kernel": 2,
                                                      "_fused_moe_kernel": 4, "_act_and_mul_kernel": 1}


class Step(NamedTuple):
    """One step's batch as the runner builds it: decodes (longest first), then prefill chunks (prefix, chunk
    length). The block table is as wide as the longest sequence needs, so its width changes from step to step."""
    decode_lens: list[int]
    prefills: list[tuple[int, int]]


# Warm-up: one step of each kind a model compiles for: decodes in one split, then in several (a long context
# alone; 2 splits whatever the SM count), each with every other kernel.
WARM_UP_STEPS = [Step([20, 9], [(0, 5)]), Step([300], [])]
# Batches of 1, 3, 16, 17 and 33 sequences; tables 1, 16 and 17 blocks wide; a lone token; sequence ranges at odd
# offsets (decode groups, prefills after an odd number of decodes); contexts in one split and in several.
VARIED_STEPS = [
    Step([5], []),
    Step([], [(0, 1)]),
    Step([16, 11, 2], []),
    Step([256] + [40] * 14, [(3, 14)]),
    Step([33] * 16, [(240, 17)]),
    Step([270, 100], [(5, 3), (0, 9)]),
    Step([7] * 32, [(0, 16)]),
]


def _run_step(ops: KernelOps, step: Step, target: Target) -> None:
    """Every kernel as one layer calls it in this step (decodes in two groups, the second at an offset, as the
    torch path cuts them)."""
    num_heads, num_kv_heads, head_dim, block_size, hidden, intermediate = 4, 2, 64, 16, 256, 320
    chunks = [(n - 1, 1) for n in step.decode_lens] + step.prefills
    lens = [prefix + q_len for prefix, q_len in chunks]
    cache = _paged_cache(lens, block_size, num_kv_heads, head_dim, target)
    positions = torch.cat([torch.arange(prefix, prefix + q_len) for prefix, q_len in chunks]).to(target.device)
    rows = torch.repeat_interleave(torch.tensor([q_len for _, q_len in chunks], device=target.device))
    slots = cache.block_tables[rows, positions // block_size].long() * block_size + positions % block_size
    query_start_loc = torch.cat([rows.new_zeros(1), torch.bincount(rows).cumsum(0)]).to(torch.int32)
    num_tokens, num_decodes = len(positions), len(step.decode_lens)

    x = torch.randn(num_tokens, hidden, device=target.device).to(target.dtype)
    weight = torch.ones(hidden, device=target.device, dtype=target.dtype)
    ops.rms_norm(x, weight, 1e-6)
    ops.rms_norm(x, weight, 1e-6, x.clone())
    qkv = _query(num_tokens, num_heads + 2 * num_kv_heads, head_dim, target)  # the fused projection's views
    query, key = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    value = qkv[:, num_heads + num_kv_heads:]
    rope = torch.randn(max(lens), head_dim, device=target.device)
    ops.rotary_embedding_and_write_kv(positions, query, key, value, rope, cache.kv_cache, slots)
    # Qwen3's layers: the per-head norms in the same kernel
    ops.rotary_embedding_and_write_kv(positions, query, key, value, rope, cache.kv_cache, slots, True,
                                      weight[:head_dim], weight[:head_dim], 1e-6)
    out = torch.empty_like(query)
    half = num_decodes // 2
    for first, end in ((0, half), (half, num_decodes)):
        if end > first:
            ops.paged_decode_attention(query, *cache, first, end, 0.125, max(lens[first:end]), out=out)
    if step.prefills:
        ops.prefill_attention(query, *cache, query_start_loc, num_decodes, len(lens), 0.125,
                              max(lens[num_decodes:]), out=out)
    ops.silu_and_mul(torch.randn(num_tokens, 2 * intermediate, device=target.device).to(target.dtype))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the test below counts real compilations")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varied_batches_launch_only_the_kernel_variants_of_the_warm_up(dtype: torch.dtype,
                                                                      launches: set[tuple]) -> None:
    ops, target = get_ops("triton"), Target("cpu", dtype, 0.0, 0.0, 1)
    for step in WARM_UP_STEPS:
        _run_step(ops, step, target)
    warm = set(launches)
    # Per model and dtype: decode's stage 1 writing the output and writing partials, the merge; RMSNorm over the
    # hidden size and with a residual; the rotation and KV write without and with per-head norms (Llama's and
    # Qwen3's layers); one of each other kernel.
    assert Counter(name for name, *_ in warm) == {
        "_decode_split_kernel": 2, "_merge_splits_kernel": 1, "_prefill_kernel": 1,
        "_rms_norm_kernel": 2, "_rotary_write_kv_kernel": 2, "_act_and_mul_kernel": 1}
    for step in VARIED_STEPS:
        _run_step(ops, step, target)
    assert launches == warm, f"new variants: {launches - warm}"


@pytest.mark.skipif(not HAS_CUDA, reason="counts compilations on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_varied_batches_compile_nothing_after_warm_up(dtype: torch.dtype) -> None:
    ops, target = get_ops("triton"), Target("cuda", dtype, 0.0, 0.0, 1)
    for step in WARM_UP_STEPS:
        _run_step(ops, step, target)
    torch.cuda.synchronize()
    warm = compile_count.compiled_variants()
    assert sum(warm.values()) > 0, "no compiled kernel counted: has triton's JITFunction cache moved?"
    for step in VARIED_STEPS:
        _run_step(ops, step, target)
    torch.cuda.synchronize()
    assert compile_count.compiled_variants() == warm


# bf16 alone on a GPU: each config is a compile, and the GPU check's kernels step times them all in bf16.
@pytest.mark.parametrize("target", [_target("cpu", torch.float32, 1e-5, 1), _target("cpu", torch.float16, 1e-3, 1),
                                    _target("cuda", torch.bfloat16, 2e-2, 8)])
@pytest.mark.parametrize("config", gemv.CONFIGS, ids=lambda c: f"{c.block_n}x{c.block_k}{'-dot' if c.use_dot else ''}")
def test_gemv_matches_the_reference_linear(config: gemv.GemvConfig, target: Target) -> None:
    # N and K off every block multiple: the last program's columns and the walk's last step are masked.
    n, k = 40 * target.scale + 3, 200 * target.scale + 5
    weight = torch.randn(n, k, device=target.device).to(target.dtype) / k ** 0.5
    bias = torch.randn(n, device=target.device).to(target.dtype)
    # With a bias, each config is a second compile on a GPU: there, one config takes it
    biases = (None, bias) if target.device == "cpu" or config == gemv.CONFIGS[0] else (None,)
    for num_rows in ((1, 5, gemv.MAX_ROWS) if config.use_dot else (1,)):
        x = torch.randn(num_rows, k, device=target.device).to(target.dtype)
        for b in biases:
            expected = ref.linear(x.float(), weight.float(), None if b is None else b.float()).to(target.dtype)
            _assert_close(gemv.gemv(x, weight, b, config), expected, target)
    with pytest.raises(ValueError, match="rows"):
        gemv.gemv(torch.randn(gemv.MAX_ROWS + 1 if config.use_dot else 2, k, device=target.device).to(target.dtype),
                  weight, None, config)


def test_triton_linear_runs_gemv_only_in_graph_capture_at_the_row_buckets_tune_chose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemv, "_choices", {})
    monkeypatch.setattr(gemv, "_reports", {})
    weight, bias = torch.randn(40, 48), torch.randn(40)
    assert gemv.tune([(weight, bias)]) == [] and not gemv._choices  # nothing to time off a GPU
    gemv._choices[(4, 40, 48, True, torch.float32, torch.device("cpu"))] = gemv.CONFIGS[0]
    launched = []
    monkeypatch.setattr(gemv, "gemv", lambda *args: launched.append(args) or ref.linear(*args[:3]))
    for capturing in (False, True):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        for num_rows, runs_gemv in ((0, False), (1, False), (2, True), (4, True), (5, False),
                                    (gemv.MAX_ROWS + 1, False)):
            x = torch.randn(num_rows, 48)
            del launched[:]
            torch.testing.assert_close(triton_ops.linear(x, weight, bias), ref.linear(x, weight, bias))
            assert bool(launched) == (runs_gemv and capturing), (num_rows, capturing)
            if launched:
                assert launched[0][3] == gemv.CONFIGS[0]
        del launched[:]
        triton_ops.linear(torch.randn(2, 48), weight)  # tuned with its bias: without one it is another layer
        assert not launched


def test_triton_backend_serves_every_kernel_op() -> None:
    ops = get_ops("triton")
    assert all(getattr(ops, name) is getattr(triton_ops, name) for name in KernelOps._fields)


def test_benchmark_counts_compulsory_bytes_and_causal_flops() -> None:
    # 2 sequences of 10 tokens, 4 query heads over 2 KV heads of dim 8, blocks of 4 tokens, 2-byte elements.
    kv, q_and_out, seq_lens, tables = 2 * 2 * 10 * 2 * 8 * 2, 2 * 2 * 4 * 8 * 2, 2 * 4, 2 * 3 * 4
    assert bench.decode_traffic(2, 10, 4, 2, 8, 4, 2) == (kv + q_and_out + seq_lens + tables, 2 * 4 * 10 * 8 * 4)
    # A 3-token chunk after 5 cached tokens: its queries see 6, 7 and 8 keys.
    kv, q_and_out, metadata = 2 * 8 * 2 * 8 * 2, 2 * 3 * 4 * 8 * 2, 2 * 4 + 3 * 4
    assert bench.prefill_traffic(5, 3, 4, 2, 8, 4, 2) == (kv + q_and_out + metadata, 4 * 4 * 8 * (6 + 7 + 8))
    # A decode is a one-token chunk: both count the same FLOPs.
    assert bench.prefill_traffic(9, 1, 4, 2, 8, 4, 2).flops == bench.decode_traffic(1, 10, 4, 2, 8, 4, 2).flops
    assert bench.rms_norm_traffic(3, 16, 2).bytes == (4 * 3 * 16 + 16) * 2
    assert bench.rotary_write_kv_traffic(3, 4, 2, 8, 2).bytes == 2 * 3 * 8 * 8 * 2 + 3 * (8 * 4 + 2 * 8)
    assert bench.silu_and_mul_traffic(3, 16, 2).bytes == (3 * 32 + 3 * 16) * 2
    # 3 tokens, top-2 of 4 experts (hidden 8, intermediate 5), 2 of them hit: hidden in and out, the 2 experts'
    # gate, up and down weights, an fp32 weight and an int64 id per pair; gate_up (2 x 5 x 8) and down per pair.
    moe = bench.fused_moe_traffic(3, 2, bench.MoeShape(num_experts=4, top_k=2, hidden=8, intermediate=5), 2)
    assert moe == (2 * 3 * 8 * 2 + 2 * 3 * 8 * 5 * 2 + 3 * 2 * (4 + 8), 2 * 3 * 2 * (2 * 5 * 8 + 8 * 5))


@pytest.mark.skipif(HAS_CUDA, reason="with CUDA present the benchmark runs")
def test_kernel_benchmark_refuses_to_run_without_cuda() -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main([])
    assert "CUDA" in str(exit_info.value.code)
