"""What `tokmodel serve` checks before it loads the model, which takes seconds to minutes: the device, the port
(bound here and held until the server listens on it) and the model's own config.json."""
from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import EngineConfig


class UsageError(Exception):
    """A bad argument: the CLI prints its message on one line and exits 2, as argparse does."""


def check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening: connections are refused until the app listens on it
    (aiohttp's SockSite), but no other process can take the port while the model loads."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number (0-65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r} is not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    # As every server: a restart may rebind while the last run's closed connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} is already in use") from None
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def check_model(config: EngineConfig) -> None:
    """The model exists, --max-model-len fits its context and --tensor-parallel-size splits it, read from config.json without loading weights
    (the default model is fetched and converted here on first use, once)."""
    from transformers import AutoConfig

    from engine.engine_core import derive_max_model_len
    from engine.executor import check_tensor_parallel
    from engine.loader import resolve_model

    try:
        hf_config = AutoConfig.from_pretrained(resolve_model(config.model, config.load_format))
        derive_max_model_len(config.max_model_len, hf_config)
        check_tensor_parallel(hf_config, config.tensor_parallel_size)
    except (ValueError, OSError) as e:
        raise UsageError(str(e).splitlines()[0]) from e


def load_chat_template(value: str) -> str:
    """--chat-template as vLLM reads it: a file's path, or the Jinja template itself (text that holds a brace or
    a newline, which no path here does); the template must compile."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    path = Path(value)
    if path.is_file():
        template = path.read_text()
    elif any(c in value for c in "{}\n"):
        template = value
    else:
        raise UsageError(f"--chat-template {value!r} is neither a file nor a template")
    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as e:
        raise UsageError(f"--chat-template: the template does not compile: {e}") from None
    return template
