"""A serving run's figures from its requests' timings, with vLLM's definitions and JSON keys
(`calculate_metrics` in vLLM's `benchmarks/serve.py`), so results compare with published vLLM runs:

- TPOT (time per output token, excluding the first) = (latency - TTFT) / (output tokens - 1), per request with
  more than one output token; ITL is every gap between output chunks, pooled over requests; E2EL is latency.
- Output tokens are the usage chunk's completion_tokens, else the tokenizer's count of the generated text.
- Throughputs divide by the run's duration; failed requests count in `failed` and nowhere else.
- A request is good (goodput) when it completed and each of its TTFT, TPOT and E2EL named in --goodput is at most
  its limit; TPOT counts as 0 for a request with one output token, as vLLM counts it.
- max_output_tokens_per_s and max_concurrent_requests: the busiest one-second bucket of the run."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bench.endpoint import RequestFuncOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def calculate_metrics(outputs: list[RequestFuncOutput], duration: float, tokenizer: PreTrainedTokenizerBase | None,
                      percentile_metrics: list[str], percentiles: list[float],
                      goodput: dict[str, float] | None = None) -> dict:
    """vLLM's result keys; goodput maps a metric of GOODPUT_METRICS to its limit in milliseconds."""
    per_request = {name: [] for name in METRICS}
    output_lens, good = [], 0
    for output in outputs:
        if not output.success:
            output_lens.append(0)
            continue
        num_tokens = output_tokens(output, tokenizer)
        output_lens.append(num_tokens)
        tpot = (output.latency - output.ttft) / (num_tokens - 1) if num_tokens > 1 else 0.0
        values = {"ttft": output.ttft, "tpot": tpot, "e2el": output.latency}
        per_request["ttft"].append(output.ttft)
        per_request["e2el"].append(output.latency)
        per_request["itl"] += output.itl
        if num_tokens > 1:
            per_request["tpot"].append(tpot)
        if goodput and all(values[name] * 1000 <= limit for name, limit in goodput.items()):
            good += 1
    completed = sum(o.success for o in outputs)
    total_input = sum(o.prompt_len for o in outputs if o.success)
    total_output = sum(output_lens)
    tokens_per_s, concurrent = per_second(outputs)
    result = {"duration": duration, "completed": completed, "failed": len(outputs) - completed,
              "total_input_tokens": total_input, "total_output_tokens": total_output,
              "request_throughput": completed / duration, "output_throughput": total_output / duration,
              "total_token_throughput": (total_input + total_output) / duration,
              "max_output_tokens_per_s": float(tokens_per_s.max(initial=0)),
              "max_concurrent_requests": int(concurrent.max(initial=0))}
    if goodput:
        result["request_goodput"] = good / duration
    for name in percentile_metrics:
        result |= _summary(name, per_request[name], percentiles)
    return result | {"input_lens": [o.prompt_len for o in outputs], "output_lens": output_lens,
                     "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
                     "errors": [o.error for o in outputs]}


def output_tokens(output: RequestFuncOutput, tokenizer: PreTrainedTokenizerBase | None) -> int:
    if output.output_tokens is not None:
        return output.output_tokens
    if tokenizer is None:
        raise ValueError("the endpoint sent no usage chunk, and no tokenizer was given to count the output tokens")
    return len(tokenizer.encode(output.generated_text, add_special_tokens=False))


def per_second(outputs: list[RequestFuncOutput]) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens, and requests in flight, in each second since the first successful request was sent."""
    ok = [o for o in outputs if o.success]
    if not ok:
        return np.zeros(0), np.zeros(0, dtype=int)
    start = min(o.start_time for o in ok)
    seconds = int(np.ceil(max(o.start_time + o.latency for o in ok) - start)) + 1
    tokens, concurrent = np.zeros(seconds), np.zeros(seconds, dtype=int)
    for o in ok:
        token_times = o.start_time + o.ttft + np.concatenate([[0.0], np.cumsum(o.itl)])
        np.add.at(tokens, (token_times - start).astype(int), 1)
        concurrent[int(o.start_time - start):int(o.start_time + o.latency - start) + 1] += 1
    return tokens, concurrent


def percentile_key(metric: str, p: float) -> str:
    """vLLM's name of a percentile: p99_ttft_ms, p99.9_itl_ms."""
    return f"p{int(p) if int(p) == p else p}_{metric}_ms"


def _summary(metric: str, seconds: list[float], percentiles: list[float]) -> dict:
    ms = np.asarray(seconds or [0.0]) * 1000  # vLLM reports 0 for a metric with no sample
    return {f"mean_{metric}_ms": float(ms.mean()), f"median_{metric}_ms": float(np.median(ms)),
            f"std_{metric}_ms": float(ms.std())} | {percentile_key(metric, p): float(np.percentile(ms, p))
                                                     for p in percentiles}
