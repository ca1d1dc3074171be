"""POST /start_profile and /stop_profile, as vLLM's: torch.profiler over the engine while a client's load runs
(`tokmodel profile --base-url`). Served only when `tokmodel serve` has --profiler-config."""
from __future__ import annotations

import json

from aiohttp import web

from server.errors import OpenAIError
from server.state import STATE

PROFILER_DIR = web.AppKey("profiler_dir", str)
PROFILER_CONFIG_KEYS = {"profiler", "torch_profiler_dir"}


def profiler_dir(config: str) -> str:
    """The trace directory of vLLM's --profiler-config JSON; ValueError naming the flag for anything else."""
    try:
        parsed = json.loads(config)
    except json.JSONDecodeError as e:
        raise ValueError(f"--profiler-config is not JSON: {e}") from None
    if not isinstance(parsed, dict) or parsed.get("profiler") != "torch":
        raise ValueError('--profiler-config: "profiler" must be "torch"')
    if unknown := sorted(set(parsed) - PROFILER_CONFIG_KEYS):
        raise ValueError(f"--profiler-config: unsupported keys {unknown}; TokModel reads {sorted(PROFILER_CONFIG_KEYS)}")
    if not isinstance(parsed.get("torch_profiler_dir"), str) or not parsed["torch_profiler_dir"]:
        raise ValueError('--profiler-config needs "torch_profiler_dir", the directory the traces go to')
    return parsed["torch_profiler_dir"]


def add_profiler_routes(app: web.Application, trace_dir: str) -> None:
    app[PROFILER_DIR] = trace_dir
    app.router.add_post("/start_profile", start_profile)
    app.router.add_post("/stop_profile", stop_profile)


async def start_profile(request: web.Request) -> web.Response:
    try:
        await request.app[STATE].llm.start_profile(request.app[PROFILER_DIR])
    except RuntimeError as e:  # already running
        raise OpenAIError(409, str(e)) from None
    return web.json_response({})


async def stop_profile(request: web.Request) -> web.Response:
    """{"trace": path of the Chrome/Perfetto trace} (beside it, <path>.steps.json)."""
    try:
        trace = await request.app[STATE].llm.stop_profile()
    except RuntimeError as e:  # not running
        raise OpenAIError(409, str(e)) from None
    return web.json_response({"trace": str(trace)})
