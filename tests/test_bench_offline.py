"""`tokmodel bench throughput` and `tokmodel bench latency`, in-process, at tiny sizes on a one-layer random model:
the workload is what was asked, TokModel and transformers run the same one side by side, one batch's latency
splits into its prefill and decode steps, and the presets' shapes are the published models'."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench import throughput
from bench.offline import CONFIGS, offline_config
from engine.loader import resolve_model
from server.cli import main

TINY = ["--model", str(CONFIGS / "smollm2-vocab-1-layer.json"), "--load-format", "dummy", "--dtype", "float32",
        "--threads", "1"]


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_throughput_runs_tokmodel_and_transformers_on_one_workload(capsys) -> None:
    report = run_json(capsys, "bench", "throughput", *TINY, "--peers", "tokmodel,hf-generate", "--num-prompts", "3",
                      "--input-len", "8", "--output-len", "3")
    assert report["workload"]["prompt_tokens"] == 24 and report["workload"]["output_tokens"] == 9
    ours, theirs = report["results"]["tokmodel"], report["results"]["hf-generate"]
    elapsed = ours["elapsed_s"]  # rounded to the millisecond: a tiny run's rate is known within that
    assert 9 / (elapsed + 5e-4) <= ours["output_tokens_per_s"] <= 9 / max(elapsed - 5e-4, 1e-9)
    ratio = ours["output_tokens_per_s"] / theirs["output_tokens_per_s"]
    assert report["speedup_vs"]["hf-generate"] == pytest.approx(ratio, abs=0.01)


def test_latency_splits_each_batch_into_its_prefill_and_decode_steps(capsys) -> None:
    report = run_json(capsys, "bench", "latency", *TINY, "--batch-size", "2", "--input-len", "8", "--output-len", "4",
                      "--num-iters-warmup", "1", "--num-iters", "2")
    assert len(report["latencies"]) == 2 and report["avg_latency"] == pytest.approx(sum(report["latencies"]) / 2)
    assert report["num_decode_steps"] == 2 * 3  # the prefill step gives each request its first token
    prefill_s, step_s = report["prefill_ms"]["mean"] / 1000, report["decode_step_ms"]["mean"] / 1000
    assert prefill_s + 3 * step_s <= report["avg_latency"]


def test_the_nano_vllm_preset_sets_its_workload_and_flags_beside_it_win() -> None:
    args = throughput.parse_args(["--preset", "nano-vllm", "--num-prompts", "8"])
    assert args.num_prompts == 8
    assert (args.input_len_min, args.input_len_max, args.output_len_min, args.output_len_max) == (100, 1024, 100, 1024)


@pytest.mark.parametrize("shape, billions", [("llama-3.1-8b", 8.03), ("qwen3-0.6b", 0.596), ("qwen2.5-7b", 7.62),
                                            ("mixtral-8x7b", 46.7), ("qwen3-30b-a3b", 30.5)])
def test_shapes_have_the_published_models_parameter_counts(shape: str, billions: float) -> None:
    config = offline_config(throughput.parse_args(["--shape", shape]))  # checked as the engine will read it
    assert config.load_format == "dummy"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(config.model, "dummy")))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)


def test_a_bad_workload_flag_is_a_usage_error(capsys) -> None:
    assert main(["bench", "throughput", "--peers", "tokmodel,vllm"]) == 2
    assert "--peers: unknown ['vllm']" in capsys.readouterr().err
