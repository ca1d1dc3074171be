"""`tokmodel bench serve|throughput|latency` and `tokmodel profile`: their flags here, their work in the modules
each imports when it runs (so `tokmodel --help` stays fast)."""
from __future__ import annotations

import argparse

from server.startup import UsageError


def add_bench_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from bench.serve import add_serve_args

    parser = commands.add_parser("bench", help="benchmark a server (serve) or the engine in-process "
                                 "(throughput, latency), with vLLM's flags and result keys")
    kinds = parser.add_subparsers(title="benchmarks", metavar="BENCHMARK", required=True)
    serve = kinds.add_parser("serve", parents=[common], help="load an OpenAI-compatible server, as vllm bench serve",
                             description="Load any OpenAI-compatible endpoint (TokModel, vLLM, SGLang, ...) with "
                             "vLLM's flags, definitions and JSON keys. Exit 1 when every request of a run failed.")
    add_serve_args(serve)
    serve.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from bench.serve import run_serve

    try:
        run_serve(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0
