"""The `tokmodel` command: `generate`, which a newcomer runs first; --version, help; and the one-line errors of
`serve` for bad flags, found before the model loads."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from server_fixtures import REPO
from tests.reference import hf_greedy

QUESTION = "What is the capital of France?"


def test_generate_streams_the_greedy_completion_and_reports_tokens_per_second(hf_model, tokenizer):
    result = tokmodel("generate", QUESTION, "--max-tokens", "8", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "TokModel loading the default model" in result.stderr  # stdout holds only the completion
    text, _, stats = result.stdout.rpartition("\n\n[")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    expected = hf_greedy(hf_model, chat, 8)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = expected[:expected.index(end) + 1] if end in expected else expected
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert re.match(rf"{len(expected)} tokens in [0-9.]+ s: [0-9.]+ tokens/s overall", stats), stats


def tokmodel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=None if env is None else os.environ | env)


def test_version_prints_the_version():
    result = tokmodel("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"tokmodel (\d+\.\d+\.\d+\S*|dev)\n", result.stdout), result.stdout


def test_no_arguments_prints_the_help():
    result = tokmodel()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tokmodel") and "serve" in result.stdout and "generate" in result.stdout


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("flags, message", [
    (["--port", "{busy_port}"], "port {busy_port} is already in use"),
    (["--port", "99999"], "--port 99999 is not a port number (0-65535)"),
    (["--model", "/no/such/model"], "model='/no/such/model': no such file or directory"),
    (["--max-model-len", "100000"], "max_model_len=100000 exceeds the model's context length 8192"),
])
def test_serve_refuses_bad_flags_in_one_line_before_loading_the_model(busy_port, flags, message):
    flags = [flag.format(busy_port=busy_port) for flag in flags]
    result = tokmodel("serve", "--host", "127.0.0.1", *flags)
    assert result.returncode == 2
    assert result.stderr == f"tokmodel: error: {message.format(busy_port=busy_port)}\n"  # nothing loaded, no traceback


@pytest.mark.parametrize("debug", [["--debug"], {"TOKMODEL_LOG_LEVEL": "debug"}], ids=["flag", "env"])
def test_debug_shows_the_traceback(debug):
    flags, env = (debug, None) if isinstance(debug, list) else ([], debug)
    result = tokmodel("serve", "--model", "/no/such/model", *flags, env=env)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.endswith("tokmodel: error: model='/no/such/model': no such file or directory\n")


def test_a_model_that_fails_to_load_exits_1_with_one_line(model_dir, tmp_path):
    for file in model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    result = tokmodel("serve", "--host", "127.0.0.1", "--port", "0", "--model", str(tmp_path))
    assert result.returncode == 1
    *logs, error = result.stderr.splitlines()
    assert "TokModel loading" in logs[-1] and "Traceback" not in result.stderr
    assert error.startswith("tokmodel: error: SafetensorError: "), error
