"""Errors the engine raises to its callers, named as vLLM's."""
from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine cannot go on (a CUDA error, memory it cannot get back): every request fails, new ones are
    refused, and a server exits non-zero so that its supervisor restarts it."""
