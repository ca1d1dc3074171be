"""One streaming request to an OpenAI-compatible endpoint, timed as vLLM's benchmark request functions time it
(`vllm/benchmarks/lib/endpoint_request_func.py`): TTFT from sending to the first chunk that carries output, one
inter-token latency per later such chunk, latency to the last one. A chunk carries output when its first choice
has text (completions) or a delta with more than the role (chat: content, tool calls); a closing chunk with only a
finish_reason does not, so it adds no inter-token latency. The usage chunk gives the output tokens.

A request fails, with its error kept, on a status other than 200, a connection error, a stream that breaks or
carries an error object, or a stream with no output at all: nothing is hidden or made up."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}  # backend -> default endpoint


@dataclass(frozen=True)
class RequestFuncInput:
    prompt: str
    api_url: str
    prompt_len: int
    output_len: int
    model: str
    chat: bool  # the chat completions body (messages) rather than the completions one (prompt)
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)  # sampling settings: temperature, ...


@dataclass
class RequestFuncOutput:
    prompt_len: int = 0
    success: bool = False
    generated_text: str = ""
    output_tokens: int | None = None  # from the usage chunk; None when the endpoint sent none
    start_time: float = 0.0  # time.perf_counter() when the request was sent
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def request_body(request: RequestFuncInput) -> dict:
    body = {"model": request.model, "stream": True, "stream_options": {"include_usage": True}}
    if request.chat:
        body |= {"messages": [{"role": "user", "content": request.prompt}], "max_completion_tokens": request.output_len}
    else:
        body |= {"prompt": request.prompt, "max_tokens": request.output_len}
    if request.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension, which TokModel and SGLang also take
    return body | request.extra_body


async def send_request(request: RequestFuncInput, session: aiohttp.ClientSession) -> RequestFuncOutput:
    output = RequestFuncOutput(prompt_len=request.prompt_len, start_time=time.perf_counter())
    last = output.start_time
    try:
        async with session.post(request.api_url, json=request_body(request)) as response:
            if response.status != 200:
                output.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return output
            async for line in response.content:
                data = line.strip().removeprefix(b"data:").strip()
                if not data or data.startswith(b":") or data == b"[DONE]":  # blank, SSE comment (a ping), the end
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    output.error = f"error in the stream: {json.dumps(chunk['error'])[:300]}"
                    return output
                if chunk.get("usage"):
                    output.output_tokens = chunk["usage"].get("completion_tokens")
                text = _output_of(chunk, request.chat)
                if text is None:
                    continue
                now = time.perf_counter()
                if output.ttft == 0.0:
                    output.ttft = now - output.start_time
                else:
                    output.itl.append(now - last)
                last = now
                output.generated_text += text
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: a chunk that is not JSON
        output.error = f"{type(e).__name__}: {e}"
        return output
    output.latency = last - output.start_time
    output.success = output.ttft > 0.0
    if not output.success:
        output.error = "the stream ended without output"
    return output


def _output_of(chunk: dict, chat: bool) -> str | None:
    """The output text a chunk carries ("" for tool calls), or None when it carries none."""
    choices = chunk.get("choices")
    if not choices:
        return None
    if not chat:
        return choices[0].get("text") or None
    delta = {k: v for k, v in (choices[0].get("delta") or {}).items() if k != "role" and v not in (None, "", [])}
    return (delta.get("content") or "") if delta else None
