"""`tokmodel bench serve|throughput|latency` and `tokmodel profile`: the subcommands, each module's flags and run.
The modules import torch, transformers and the engine only when they run, so `tokmodel --help` stays fast."""
from __future__ import annotations

import argparse
from collections.abc import Callable

from bench import latency as bench_latency
from bench import profile as bench_profile
from bench import throughput as bench_throughput
from bench.serve import add_serve_args, run_serve
from server.startup import UsageError


def add_bench_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("bench", help="benchmark a server (serve) or the engine in-process "
                                 "(throughput, latency), with vLLM's flags and result keys")
    kinds = parser.add_subparsers(title="benchmarks", metavar="BENCHMARK", required=True)
    serve = kinds.add_parser("serve", parents=[common], help="load an OpenAI-compatible server, as vllm bench serve",
                             description="Load any OpenAI-compatible endpoint (TokModel, vLLM, SGLang, ...) with "
                             "vLLM's flags, definitions and JSON keys. Exit 1 when every request of a run failed.")
    add_serve_args(serve)
    serve.set_defaults(run=_usage_errors(run_serve))
    throughput = kinds.add_parser("throughput", parents=[common], help="offline throughput in this process, as "
                                  "vllm bench throughput; --compare transformers", description=bench_throughput.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_throughput.add_throughput_args(throughput)
    throughput.set_defaults(run=_usage_errors(lambda args: bench_throughput.run(bench_throughput.checked(args))))
    latency = kinds.add_parser("latency", parents=[common], help="one batch's latency in this process (prefill, "
                               "decode steps), as vllm bench latency", description=bench_latency.__doc__)
    bench_latency.add_latency_args(latency)
    latency.set_defaults(run=_usage_errors(bench_latency.run_latency))


def add_profile_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("profile", parents=[common], help="profile a short workload (in process, or a "
                                 "running server): trace, host/device split, per-kernel roofline table",
                                 description=bench_profile.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_profile.add_profile_args(parser)
    parser.set_defaults(run=_usage_errors(bench_profile.run_profile))


def _usage_errors(run: Callable[[argparse.Namespace], object]) -> Callable[[argparse.Namespace], int]:
    """The command's run, a ValueError (a bad flag, named) turned into the CLI's usage error (exit 2)."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            run(args)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return 0

    return wrapped
