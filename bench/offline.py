"""The flags and the engine of the in-process tools (`tokmodel bench throughput|latency`, `tokmodel profile`):
the engine flags of `tokmodel serve`, plus model shapes with random weights and the torch thread count."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine import LLM
    from engine.config import EngineConfig

CONFIGS = Path(__file__).resolve().parent / "configs"  # model shapes (config.json files) for --load-format dummy
SHAPES = ("llama-3.1-8b", "qwen3-0.6b", "qwen2.5-7b", "llama-3-8b", "qwen3-8b", "mixtral-8x7b", "qwen3-30b-a3b")


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    from server.cli import add_engine_args

    add_engine_args(parser)
    parser.add_argument("--shape", choices=SHAPES, help="a model shape with random weights: --model "
                        "bench/configs/SHAPE.json --load-format dummy")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, one per core); "
                        "on a machine shared with other jobs, 1 avoids stalls at thread barriers")


def offline_config(args: argparse.Namespace) -> EngineConfig:
    """The checked EngineConfig of the flags (UsageError naming a bad one), with --shape and --threads applied."""
    import torch

    from server.cli import checked_engine_config

    if args.shape:
        args.model, args.load_format = str(CONFIGS / f"{args.shape}.json"), "dummy"
    if args.threads:
        torch.set_num_threads(args.threads)
    return checked_engine_config(args)


def build_llm(config: EngineConfig) -> LLM:
    from engine import LLM

    return LLM(**dataclasses.asdict(config))
