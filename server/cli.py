"""The `tokmodel` command. Each subcommand is one add_*_command function; engine flags are shared by all.
A bad argument prints one line and exits 2; any other failure one line and exits 1 (with its traceback in debug)."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import socket
import sys
import traceback
from typing import TYPE_CHECKING

from bench.cli import add_bench_command, add_profile_command
from server.logging_config import LOG_LEVEL_ENV, configure_logging
from server.response_store import DEFAULT_MAX_STORED_RESPONSES
from server.startup import UsageError, bind_socket, check_device, check_model, load_chat_template
from server.tool_parsers import TOOL_PARSERS
from server.version import package_version

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from server.app import ServerOptions

logger = logging.getLogger("tokmodel.cli")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):  # a bare `tokmodel`: say what it can do
        parser.print_help()
        return 0
    debug = args.debug
    try:
        debug = configure_logging(args.debug) <= logging.DEBUG
        return args.run(args)
    except UsageError as e:
        return _fail(str(e), 2, debug)
    except KeyboardInterrupt:  # Ctrl-C before the server handles signals, e.g. while the model loads
        return 130
    except Exception as e:  # the model failed to load, the engine raised: one line, not a traceback
        return _fail(f"{type(e).__name__}: {e}", 1, debug)


def _fail(message: str, exit_code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    first_line = message.strip().splitlines()[0] if message.strip() else message
    print(f"tokmodel: error: {first_line}", file=sys.stderr)
    return exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokmodel", description="TokModel: a continuous-batching LLM engine "
                                     "with a paged KV cache and an OpenAI-compatible server.")
    parser.add_argument("--version", action="version", version=f"tokmodel {package_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help=f"log at debug level and show tracebacks of errors (as {LOG_LEVEL_ENV}=debug)")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_serve_command(commands, common)
    add_generate_command(commands, common)
    add_bench_command(commands, common)
    add_profile_command(commands, common)
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
    group.add_argument("--kv-cache-memory-bytes", type=int, help="KV-cache budget on CPU in bytes (default: 2 GiB)")
    group.add_argument("--num-gpu-blocks-override", type=int, help="exact number of KV-cache blocks, ignoring the budget")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       help="reuse KV blocks of identical prompt prefixes across requests (default: on)")
    group.add_argument("--load-format", choices=["auto", "dummy"], help="dummy: random weights, for benchmarks (default: auto)")
    group.add_argument("--seed", type=int, help="seed of the engine's random state (default: 0)")
    group.add_argument("--tensor-parallel-size", "-tp", type=int,
                       help="split the model over this many ranks, one process each (GPUs: one per rank; default: 1)")
    group.add_argument("--nnodes", type=int, help="machines the tensor-parallel ranks span (default: 1)")
    group.add_argument("--node-rank", type=int,
                       help="this machine's index among --nnodes; 0 serves HTTP, the others run workers only")
    group.add_argument("--master-addr", help="address of node 0, where the ranks meet (default: 127.0.0.1)")
    group.add_argument("--master-port", type=int, help="port of node 0 where the ranks meet (needed with --nnodes)")
    group.add_argument("--data-parallel-size", "-dp", type=int,
                       help="serve with this many engine replicas, one process each, requests routed to the least "
                       "loaded or to the one that holds their prefix (default: 1)")
    group.add_argument("--kernel-backend", choices=["torch", "triton", "cpu"],
                       help="attention and fused kernels (default: triton on cuda; on a cpu, cpu: the PyTorch "
                       "reference with decode attention compiled from C, or torch without a C compiler)")
    group.add_argument("--enforce-eager", action="store_true", default=None,
                       help="no CUDA graphs: run every decode step eagerly (graphs need --kernel-backend triton)")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                       help="schedule and launch step N+1 while step N's tokens are processed: the same outputs, "
                       "less idle device time (default: on with cuda, off on a cpu; ignored with --tensor-parallel-size > 1)")


def checked_engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the engine flags, its device and model checked without loading the model."""
    from engine.config import EngineConfig  # imports torch: only once a command runs, so --help stays fast

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    given = {name: value for name, value in vars(args).items() if name in names and value is not None}
    try:
        config = EngineConfig(**given)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_device(config.device)
    check_model(config)
    return config


def _log_loading(config: EngineConfig) -> None:
    logger.info("TokModel loading %s on %s", config.model or "the default model", config.device)


def add_serve_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("serve", parents=[common], help="serve the OpenAI-compatible HTTP API",
                                 description="Check the flags and bind the port, load the model, then serve "
                                 "/v1/chat/completions, /v1/completions, /v1/responses, /v1/models, /tokenize, "
                                 "/detokenize, /health, /ping, /invocations, /load, /version and /metrics. Exit codes: 0 after a drain, 1 when the "
                                 "engine dies or the model fails to load, 2 for a bad flag or a busy port.")
    add_engine_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    group.add_argument("--api-key", default=os.environ.get("TOKMODEL_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $TOKMODEL_API_KEY; none: no check)")
    group.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="answer 429 with Retry-After while this many requests wait (default: 1024)")
    group.add_argument("--shutdown-grace-period", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after the first SIGTERM or Ctrl-C, before "
                       "they are aborted; a second signal aborts them at once (default: 30)")
    group.add_argument("--disable-uvicorn-access-log", action="store_true",
                       help="no access-log line per HTTP request (vLLM's name for it)")
    group.add_argument("--enable-log-requests", action="store_true",
                       help="log a line per request as it ends: id, token counts, finish reasons, sampling settings")
    group.add_argument("--max-stored-responses", type=int, default=DEFAULT_MAX_STORED_RESPONSES,
                       help="how many /v1/responses created with store: true are kept in memory, for GET "
                       "/v1/responses/{id} and previous_response_id; past it the oldest are forgotten "
                       f"(default: {DEFAULT_MAX_STORED_RESPONSES})")
    group.add_argument("--profiler-config", help='vLLM\'s profiler settings as JSON, {"profiler": "torch", '
                       '"torch_profiler_dir": "DIR"}: serves POST /start_profile and /stop_profile, which write a '
                       "torch.profiler trace of the engine to DIR (tokmodel profile --base-url drives them)")
    group.add_argument("--stats-log-interval", type=float, default=10.0, help=argparse.SUPPRESS)  # tests shorten it
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='honour tool_choice "auto" (the default with tools): the model decides, and '
                       "--tool-call-parser reads its calls from its text")
    group.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS),
                       help="the format the model writes tool calls in, for --enable-auto-tool-choice")
    group.add_argument("--chat-template", help="a Jinja chat template, or the path of a file holding one, used instead "
                       "of the model's")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="let requests bring their own chat template (chat_template, or chat_template_kwargs' "
                       "chat_template); without it such requests get a 400, as in vLLM")
    group.add_argument("--enable-server-load-tracking", action="store_true",
                       help="count generation requests in flight, for GET /load ({\"server_load\": N})")
    group.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                       help="serve GET /tokenizer_info (the tokenizer's configuration and chat template)")
    parser.set_defaults(run=serve)


def serve(args: argparse.Namespace) -> int:
    from server.app import ServerOptions
    from server.profiling import profiler_dir

    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise UsageError("--enable-auto-tool-choice requires --tool-call-parser")
    if args.node_rank:  # a worker node: no HTTP
        return _serve_worker_node(checked_engine_config(args))
    try:
        trace_dir = profiler_dir(args.profiler_config) if args.profiler_config else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    sock = bind_socket(args.host, args.port)
    config = checked_engine_config(args)
    chat_template = load_chat_template(args.chat_template) if args.chat_template is not None else None
    options = ServerOptions(args.api_key, args.max_waiting_requests, args.shutdown_grace_period,
                            access_log=not args.disable_uvicorn_access_log, log_requests=args.enable_log_requests,
                            stats_interval_s=args.stats_log_interval, max_stored_responses=args.max_stored_responses,
                            tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                            chat_template=chat_template, trust_request_chat_template=args.trust_request_chat_template,
                            enable_server_load_tracking=args.enable_server_load_tracking,
                            enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
                            profiler_dir=trace_dir)
    return asyncio.run(_load_and_serve(config, options, sock))


def _serve_worker_node(config: EngineConfig) -> int:
    from engine.executor import run_headless_node
    from engine.loader import resolve_model

    logger.info("TokModel node %d of %d: tensor-parallel ranks %d-%d, joining %s:%d", config.node_rank,
                config.nnodes, config.node_rank * config.ranks_per_node,
                (config.node_rank + 1) * config.ranks_per_node - 1, config.master_addr, config.master_port)
    return run_headless_node(config, resolve_model(config.model, config.load_format))


async def _load_and_serve(config: EngineConfig, options: ServerOptions, sock: socket.socket) -> int:
    from engine.async_llm import AsyncLLM
    from engine.data_parallel import DPAsyncLLM
    from server.lifecycle import serve

    _log_loading(config)
    # Created inside the loop that will await its outputs.
    llm = DPAsyncLLM(config) if config.data_parallel_size > 1 else AsyncLLM(config)
    try:
        return await serve(llm, options, sock)
    finally:
        llm.shutdown()


def add_generate_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("generate", parents=[common],
                                 help="stream one completion to the terminal and print tokens/s",
                                 description="Generate a completion for PROMPT offline (no server), streaming the "
                                 "text as it comes; the prompt goes through the model's chat template unless --no-chat.")
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                        help="apply the model's chat template to the prompt (default: on)")
    add_engine_args(parser)
    parser.set_defaults(run=generate)


def generate(args: argparse.Namespace) -> int:
    import time

    from engine.engine_core import EngineCore
    from engine.sampling_params import RequestOutputKind, SamplingParams

    config = checked_engine_config(args)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                output_kind=RequestOutputKind.DELTA)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _log_loading(config)
    core = EngineCore(config)
    prompt = args.prompt
    if args.chat and core.tokenizer is not None and core.tokenizer.chat_template:
        prompt = {"prompt_token_ids": core.tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False)}
    try:
        core.add_request("generate", prompt, params)
    except ValueError as e:
        raise UsageError(str(e)) from None
    start, first_token_time, num_tokens = time.perf_counter(), None, 0
    while core.has_unfinished_requests():
        for output in core.step():
            delta = output.outputs[0]
            first_token_time = first_token_time or time.perf_counter()
            num_tokens += len(delta.token_ids)
            print(delta.text, end="", flush=True)
    elapsed = time.perf_counter() - start
    decode_rate = (num_tokens - 1) / (time.perf_counter() - first_token_time) if num_tokens > 1 else 0.0
    print(f"\n\n[{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tokens/s overall, "
          f"{decode_rate:.1f} tokens/s after the first; time to first token {first_token_time - start:.2f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
