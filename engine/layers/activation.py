"""The gated activations of the MLPs, by the name config.json gives them (hidden_act / hidden_activation)."""
from __future__ import annotations


def act_and_mul_op(name: str) -> str:
    """The KernelOps field computing act(gate) * up over x = [gate | up]: SiLU (SwiGLU) or GELU's tanh
    approximation (GeGLU). A name, looked up on the layer's ops at each call, so that ops swapped in later (the
    profiler's annotated ones) are the ones that run."""
    if name in ("silu", "swish"):
        return "silu_and_mul"
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh_and_mul"
    raise ValueError(f"hidden activation {name!r} is not supported (supported: silu, gelu_pytorch_tanh)")
