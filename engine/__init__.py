"""TokModel's engine: paged KV cache, continuous batching, sampling; the offline LLM and AsyncLLM APIs."""
from engine.config import EngineConfig
from engine.async_llm import AsyncLLM
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "AsyncLLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestOutputKind"]
