from setuptools import find_packages, setup

setup(
    name="tokmodel",
    version="0.1.0",
    description="A continuous-batching LLM serving engine in Python with a paged KV cache and an OpenAI-compatible API",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "server", "server.*", "bench",
                                    "bench.*"]),
    package_data={"bench": ["configs/*.json"]},  # the model shapes of --shape
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.46",
        "safetensors",
        "aiohttp>=3.9",
        "numpy",
        "gguf>=0.10",
        "tqdm",
        "huggingface_hub",
        "prometheus_client",
        "xgrammar>=0.2.8",
    ],
    extras_require={
        "client": ["openai>=1.0"],  # examples/chat_client.py
        # matplotlib: the GPU check's dry run (tests/test_gpu_check.py) draws its chart too; pydantic-ai and
        # instructor: structured-output client libraries in the tests
        "test": ["pytest", "accelerate", "openai>=1.0", "jsonschema", "matplotlib", "openai-agents",
                 "instructor>=1.17", "pydantic-ai-slim[openai]"],
        "bench": ["matplotlib", "accelerate", "transformers[serving]"],
    },
    entry_points={"console_scripts": ["tokmodel=server.cli:main"]},
)
