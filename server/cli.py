"""The `tokmodel` command. Each subcommand is one add_*_command function; engine flags are shared by all."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.run(args, parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokmodel", description="TokModel: a continuous-batching LLM engine "
                                     "with a paged KV cache and an OpenAI-compatible server.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    add_serve_command(commands)
    return parser


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags named as vLLM's; each dest is an EngineConfig field, and None leaves EngineConfig's default."""
    group = parser.add_argument_group("engine")
    group.add_argument("--model", help="Hugging Face directory, hub id or GGUF file (default: SmolLM2-135M-Instruct, "
                       "fetched and cached on first use)")
    group.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's own)")
    group.add_argument("--served-model-name", help="the model name clients send and see (default: from --model)")
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    group.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "bf16", "fp16", "half", "float"],
                       help="weight and activation dtype (default: bfloat16 on cuda or a CPU with fast bf16, else float32)")
    group.add_argument("--max-model-len", type=int, help="longest prompt + output in tokens (default: the model's context)")
    group.add_argument("--max-num-seqs", type=int, help="most requests in one batch (default: 256)")
    group.add_argument("--max-num-batched-tokens", type=int,
                       help="most tokens in one step, prefill chunks included (default: 8192 on cuda, 2048 on cpu)")
    group.add_argument("--block-size", type=int, help="tokens per KV-cache block, a power of two (default: 16)")
    group.add_argument("--gpu-memory-utilization", type=float,
                       help="fraction of GPU memory for weights, activations and KV cache (default: 0.9)")
    group.add_argument("--kv-cache-memory-bytes", type=int, help="KV-cache budget on CPU in bytes (default: 4 GiB)")
    group.add_argument("--num-gpu-blocks-override", type=int, help="exact number of KV-cache blocks, ignoring the budget")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       help="reuse KV blocks of identical prompt prefixes across requests (default: on)")
    group.add_argument("--load-format", choices=["auto", "dummy"], help="dummy: random weights, for benchmarks (default: auto)")
    group.add_argument("--seed", type=int, help="seed of the engine's random state (default: 0)")
    group.add_argument("--kernel-backend", choices=["torch", "triton"],
                       help="attention and fused kernels (default: triton on cuda, torch on cpu)")


def engine_config_from_args(args: argparse.Namespace):
    from engine.config import EngineConfig  # imports torch: only once a command runs, so --help stays fast

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{name: value for name, value in vars(args).items() if name in names and value is not None})


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                                 description="Load the model, then serve /v1/chat/completions, /v1/completions, "
                                 "/v1/models, /tokenize, /detokenize, /health, /version and /metrics.")
    add_engine_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    group.add_argument("--api-key", default=os.environ.get("TOKMODEL_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $TOKMODEL_API_KEY; none: no check)")
    group.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="answer 429 with Retry-After while this many requests wait (default: 1024)")
    group.add_argument("--shutdown-grace-period", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM before they are aborted (default: 30)")
    parser.set_defaults(run=serve)


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from engine.async_llm import AsyncLLM
    from server.app import ServerOptions, serve as serve_app

    try:
        config = engine_config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    options = ServerOptions(args.host, args.port, args.api_key, args.max_waiting_requests, args.shutdown_grace_period)

    async def run() -> None:
        print(f"TokModel loading {config.model or 'the default model'} on {config.device}", flush=True)
        llm = AsyncLLM(config)  # created inside the loop that will await its outputs
        try:
            await serve_app(llm, options)
        finally:
            llm.shutdown()

    asyncio.run(run())


if __name__ == "__main__":
    main()
