"""The Triton launchers as torch.library ops (kernels/triton_ops.py): each is torch.ops.tokmodel.<name>, passes
torch.library.opcheck (schema and declared mutations, fake implementation, AOT dispatch with dynamic shapes) on small
inputs in the interpreter, and a module calling them compiles in one graph."""
from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch

from kernels import get_ops
from kernels import reference as ref
from kernels import triton_ops  # noqa: F401 (defines torch.ops.tokmodel)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 16, 16


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE)


def _cache(seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_cache, block_tables, seq_lens): sequence i owns blocks i * width .. (i + 1) * width - 1."""
    width = -(-max(seq_lens) // BLOCK_SIZE)
    kv_cache = _randn(2, width * len(seq_lens), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    tables = torch.arange(width * len(seq_lens), dtype=torch.int32, device=DEVICE).view(len(seq_lens), width)
    return kv_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


def _moe_args() -> tuple:
    tokens, experts, hidden, intermediate = 5, 4, 32, 16
    topk_weights, topk_ids = torch.softmax(_randn(tokens, experts), -1).topk(2, dim=-1)
    return (_randn(tokens, hidden), _randn(experts, 2 * intermediate, hidden) / 4,
            _randn(experts, hidden, intermediate) / 4, topk_weights, topk_ids)


# name: (args, kwargs) of one call of torch.ops.tokmodel.<name>
OP_CALLS: dict[str, Callable[[], tuple[tuple, dict]]] = {
    "rotary_embedding_and_write_kv": lambda: ((torch.tensor([0, 3, 7], device=DEVICE), _randn(3, NUM_HEADS, HEAD_DIM),
                                               _randn(3, NUM_KV_HEADS, HEAD_DIM), _randn(3, NUM_KV_HEADS, HEAD_DIM),
                                               _randn(8, HEAD_DIM), *_cache([20])[:1],
                                               torch.tensor([0, -1, 5], device=DEVICE)),
                                              {"is_neox": False, "q_norm_weight": _randn(HEAD_DIM),
                                               "k_norm_weight": _randn(HEAD_DIM), "norm_eps": 1e-6,
                                               "norm_weight_offset": 1.0}),
    "paged_decode_attention": lambda: ((torch.zeros(3, NUM_HEADS, HEAD_DIM, device=DEVICE),
                                        _randn(3, NUM_HEADS, HEAD_DIM), *_cache([5, 20, 9]), 1, 3, 0.25, 20, None,
                                        None), {}),
    "prefill_attention": lambda: ((torch.zeros(7, NUM_HEADS, HEAD_DIM, device=DEVICE),
                                   _randn(7, NUM_HEADS, HEAD_DIM), *_cache([9, 20]),
                                   torch.tensor([0, 1, 7], dtype=torch.int32, device=DEVICE), 0, 2, 0.25, 20, 8,
                                   30.0), {}),
    "rms_norm": lambda: ((_randn(3, 32), _randn(32), 1e-6, 0.0), {}),
    "fused_add_rms_norm": lambda: ((_randn(3, 32), _randn(3, 32), _randn(32), 1e-6, 1.0), {}),
    "gemv": lambda: ((_randn(3, 48), _randn(40, 48), _randn(40), 16, 32, 4, 2, True), {}),
    "silu_and_mul": lambda: ((_randn(3, 64),), {}),
    "gelu_tanh_and_mul": lambda: ((_randn(3, 64),), {}),
    "fused_moe": lambda: (_moe_args(), {}),
}


def test_every_kernel_op_is_a_tokmodel_op() -> None:
    ops = get_ops("triton")
    # linear and embedding are torch's own (aten::linear on cuBLAS, aten::embedding), ops torch.compile already
    # knows, linear at decode batches maybe tokmodel::gemv (in OP_CALLS); the weight's packing and tune_linear run
    # once at load and warm-up, outside any compiled graph.
    own = set(ops._fields) - {"linear", "tune_linear", "pack_linear_weight", "embedding"}
    for name in own:
        assert hasattr(torch.ops.tokmodel, name), f"torch.ops.tokmodel.{name} is missing"
    assert set(OP_CALLS) >= own


@pytest.mark.parametrize("name", OP_CALLS)
def test_op_passes_opcheck(name: str) -> None:
    args, kwargs = OP_CALLS[name]()
    torch.library.opcheck(getattr(torch.ops.tokmodel, name).default, args, kwargs)


class TinyAttention(torch.nn.Module):
    """One layer's norm, rotary, KV write, decode and prefill attention and gated MLP, through KernelOps."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.ops = get_ops(backend)
        self.weight = torch.nn.Parameter(torch.ones(NUM_HEADS * HEAD_DIM, device=DEVICE), requires_grad=False)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor,
                kv_cache: torch.Tensor, tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.ops.rms_norm(hidden, self.weight, 1e-6, residual)
        query = hidden.view(-1, NUM_HEADS, HEAD_DIM).clone()
        key, value = query[:, :NUM_KV_HEADS].contiguous(), query[:, NUM_KV_HEADS:].contiguous()
        self.ops.rotary_embedding_and_write_kv(positions, query, key, value, rope, kv_cache, slots)
        out = torch.empty_like(query)
        self.ops.paged_decode_attention(query, kv_cache, tables, seq_lens, 0, 1, HEAD_DIM ** -0.5, 20, out=out)
        self.ops.prefill_attention(query, kv_cache, tables, seq_lens, query_start_loc, 1, 2, HEAD_DIM ** -0.5, 20,
                                   sliding_window=4, out=out)
        return self.ops.silu_and_mul(out.view(out.shape[0], -1)) + residual[:, :NUM_HEADS * HEAD_DIM // 2]


def _tiny_inputs() -> tuple:
    kv_cache, tables, seq_lens = _cache([20, 6])
    num_tokens = 7  # a decode at position 19, then a 6-token prefill
    return (_randn(num_tokens, NUM_HEADS * HEAD_DIM), _randn(num_tokens, NUM_HEADS * HEAD_DIM),
            torch.tensor([19, 0, 1, 2, 3, 4, 5], device=DEVICE), _randn(32, HEAD_DIM), kv_cache, tables, seq_lens,
            torch.tensor([0, 1, 7], dtype=torch.int32, device=DEVICE),
            torch.tensor([19, 32, 33, 34, 35, 36, 37], device=DEVICE))


def test_a_module_of_kernel_ops_compiles_in_one_graph_and_matches_the_reference() -> None:
    inputs = _tiny_inputs()
    expected_cache = inputs[4].clone()
    expected = TinyAttention("torch")(*inputs[:4], expected_cache, *inputs[5:])
    compiled = torch.compile(TinyAttention("triton"), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*inputs), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inputs[4], expected_cache, atol=1e-5, rtol=1e-5)  # the KV write reached the cache


def test_a_module_of_kernel_ops_exports() -> None:
    exported = torch.export.export(TinyAttention("triton"), _tiny_inputs())
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("tokmodel.paged_decode_attention" in t for t in targets), targets
    assert any("tokmodel.fused_add_rms_norm" in t for t in targets), targets


def _parameters(fn: Callable) -> list[str]:
    if isinstance(fn, torch._ops.OpOverload):
        return [argument.name for argument in fn._schema.arguments]
    return list(inspect.signature(fn).parameters)


def test_both_backends_take_the_same_arguments() -> None:
    # One KernelOps contract: the attention ops select sequences by ints (a custom op takes no Python slice).
    torch_backend = get_ops("torch")
    for backend in (get_ops("triton"), get_ops("cpu")):
        for name in torch_backend._fields:
            assert _parameters(getattr(backend, name)) == _parameters(getattr(torch_backend, name)), name
    assert {"first_seq", "end_seq"} <= set(_parameters(ref.paged_decode_attention))
