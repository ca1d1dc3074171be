"""The model runner's persistent batch and the CUDA-graph decode path, on the CPU: rows that change only where
a sequence joins, leaves or grows stay equal to what the scheduler holds, and decode steps padded to the graph
sizes on the static step buffers (run eagerly: a CPU has no graphs) give the tokens of the plain path, with
requests that join, finish, get preempted and get aborted mid-run, n > 1, seeds and stop strings."""
from __future__ import annotations

import pytest

from engine import EngineConfig, SamplingParams
from engine.cuda_graphs import capture_sizes
from engine.engine_core import EngineCore
from tests.reference import hf_greedy

PROMPTS = ["The capital of France is", "List three colors:", "Once upon a time, in a land far away,",
           "def fibonacci(n):", "The best way to learn a language is"]
MAX_TOKENS = 6


def make_engine(**overrides) -> EngineCore:
    # Blocks of 8 tokens, for about three sequences at a time, and max_num_seqs 6 (graph sizes 1, 2, 4, 6): the
    # scheduler preempts, and decode steps of 3 and 5 sequences are padded.
    config = dict(device="cpu", dtype="float32", kernel_backend="torch", max_model_len=128, max_num_seqs=6,
                  block_size=8, num_gpu_blocks_override=7)
    return EngineCore(EngineConfig(**(config | overrides)))


def check_rows_match_scheduler(engine: EngineCore) -> None:
    """Every sequence the runner holds: its block ids and its tokens so far, as the scheduler has them (with async
    scheduling -1 where the runner read a token on the device, which the scheduler may not have yet)."""
    batch, leaving = engine.runner.input_batch, set(engine.scheduler.finished_req_ids)
    assert set(batch.req_ids) - set(engine.scheduler.requests) <= leaving, "a finished row stays past the next step"
    for req_id, row in batch.row_of.items():
        if req_id in leaving:
            continue
        request = engine.scheduler.requests[req_id]
        assert batch.req_ids[row] == req_id
        assert list(batch.block_table[row, :batch.num_blocks[row]]) == request.block_ids, req_id
        num_tokens = int(batch.num_tokens[row])
        held = [int(t) for t in batch.token_ids[row, :num_tokens]]
        known = request.all_token_ids[:num_tokens] + [-1] * request.num_output_placeholders
        assert [-1 if h == -1 else k for h, k in zip(held, known)] == held[:len(known)], req_id
        assert len(known) >= num_tokens, req_id
        assert num_tokens >= request.num_computed_tokens


def run_mixed_traffic(engine: EngineCore) -> dict:
    """Greedy, seeded n=2, and stop-string requests; one joins mid-run and one is aborted mid-run."""
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine.add_request("greedy-0", PROMPTS[0], greedy)
    engine.add_request("seeded", PROMPTS[1], SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=MAX_TOKENS,
                                                           ignore_eos=True))
    engine.add_request("stop", PROMPTS[2], SamplingParams(temperature=0.8, seed=3, max_tokens=MAX_TOKENS, stop=["e"]))
    engine.add_request("aborted", PROMPTS[3], greedy)
    final, step = {}, 0
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
        check_rows_match_scheduler(engine)
        step += 1
        if step == 3:
            engine.add_request("greedy-late", PROMPTS[4], greedy)
        if step == 5:
            final["aborted"] = engine.abort_request("aborted")
    assert engine.scheduler.num_preemptions > 0, "the cache was meant to run out"
    assert set(engine.runner.input_batch.req_ids) <= set(engine.scheduler.finished_req_ids), "rows left behind"
    return {rid: [(c.token_ids, c.text, c.finish_reason) for c in out.outputs] for rid, out in final.items()}


@pytest.fixture(scope="module")
def plain_outputs() -> dict:
    return run_mixed_traffic(make_engine())


def test_capture_sizes_are_vllms():
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(1000)[-1] == 512


def test_persistent_batch_serves_greedy_requests_as_transformers(plain_outputs, hf_model, tokenizer):
    for request_id, prompt in (("greedy-0", PROMPTS[0]), ("greedy-late", PROMPTS[4])):
        [(token_ids, _, finish_reason)] = plain_outputs[request_id]
        assert token_ids == hf_greedy(hf_model, tokenizer.encode(prompt), MAX_TOKENS)
        assert finish_reason == "length"
    assert [c[2] for c in plain_outputs["aborted"]] == ["abort"]
    assert plain_outputs["stop"][0][2] == "stop" and "e" not in plain_outputs["stop"][0][1]


def test_decode_steps_padded_to_graph_sizes_give_identical_outputs(plain_outputs):
    engine = make_engine(eager_graph_padding=True)
    padded_sizes = []
    prepare = engine.runner._prepare_inputs

    def recording(output):
        prepared = prepare(output)
        meta = prepared[2]
        if meta.num_prefills == 0:
            padded_sizes.append((len(output.req_ids), meta.num_decodes))
        return prepared
    engine.runner._prepare_inputs = recording
    assert run_mixed_traffic(engine) == plain_outputs
    assert any(padded > real for real, padded in padded_sizes), f"no step was padded: {padded_sizes}"
    assert all(padded in capture_sizes(6) for _, padded in padded_sizes)


def test_enforce_eager_flag_reaches_the_engine_config():
    from server.cli import build_parser, checked_engine_config

    for argv, eager in ((["serve"], False), (["serve", "--enforce-eager"], True)):
        assert checked_engine_config(build_parser().parse_args(argv)).enforce_eager is eager
