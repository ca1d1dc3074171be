"""What a user of the engine sees per request: n choices sharing the prompt's blocks, seeds, stop strings,
max_tokens, logprobs, aborts and rejections."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import EngineConfig, RequestOutputKind, SamplingParams
from engine.engine_core import EngineCore
from tests.reference import hf_greedy, hf_logprobs

PROMPT = "The history of the printing press begins in the fifteenth century, when a goldsmith named"


@pytest.fixture(scope="module")
def engine() -> EngineCore:
    return EngineCore(EngineConfig(device="cpu", dtype="float32", kernel_backend="torch", block_size=16))


def run(engine: EngineCore, prompts: dict[str, object], params: SamplingParams | list[SamplingParams]) -> dict:
    """Add the requests (params: for all, or one per request), step to completion, return {request_id: final
    cumulative RequestOutput}."""
    per_request = params if isinstance(params, list) else [params] * len(prompts)
    for (request_id, prompt), request_params in zip(prompts.items(), per_request):
        engine.add_request(request_id, prompt, request_params)
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    # A request that failed in the engine ends with finish_reason "error": never what these tests expect.
    assert all(c.finish_reason != "error" for out in final.values() for c in out.outputs), final
    assert engine.kv_cache_manager.usage == 0, "finished requests must return every block"
    engine.kv_cache_manager.pool.check_integrity()
    return final


def test_n_choices_share_the_prompt_blocks_and_copy_only_the_partial_one(engine, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT * 3)
    num_full, partial = divmod(len(prompt_ids), 16)
    assert partial, "the prompt must end in a partial block for this test"
    free_before = engine.kv_cache_manager.pool.num_free_blocks
    engine.add_request("fan", prompt_ids, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=3))
    engine.step()  # prefill once, then fork
    seqs = [engine.scheduler.requests[f"fan-{i}"] for i in range(4)]
    assert all(s.block_ids == seqs[0].block_ids for s in seqs), "after the fork all choices share every block"
    assert free_before - engine.kv_cache_manager.pool.num_free_blocks == num_full + 1
    engine.step()  # each choice writes its second token: the shared partial block is copied for 3 of them
    assert len({s.block_ids[num_full] for s in seqs}) == 4
    assert all(s.block_ids[:num_full] == seqs[0].block_ids[:num_full] for s in seqs)
    assert free_before - engine.kv_cache_manager.pool.num_free_blocks == num_full + 4
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache_manager.usage == 0


def test_seeded_choices_differ_and_the_whole_set_reproduces(engine):
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    first = run(engine, {"a": PROMPT}, params)["a"]
    other_traffic = {"noise-1": "Tell me a joke", "noise-2": "List three colors:"}
    second = run(engine, {"b": PROMPT, **other_traffic}, params)["b"]
    texts = [c.text for c in first.outputs]
    assert len(set(texts)) > 1, "choices of one request must not all be equal"
    assert [c.token_ids for c in second.outputs] == [c.token_ids for c in first.outputs]


def test_unseeded_sampling_varies(engine):
    params = SamplingParams(n=4, temperature=1.5, max_tokens=8, ignore_eos=True)
    out = run(engine, {"u": PROMPT}, params)["u"]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_string_spanning_tokens_ends_the_text_before_it(engine, tokenizer):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = run(engine, {"full": PROMPT}, greedy)["full"].outputs[0]
    pieces = [tokenizer.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    # a stop string that starts inside token 5 and ends inside a later token
    start, end = len(pieces[5]) - 1, len(pieces[7]) + 1
    stop = full.text[start:end]
    assert len(stop) >= 3 and stop not in full.text[:start]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], output_kind=RequestOutputKind.DELTA)
    engine.add_request("stop", PROMPT, params)
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [o.outputs[0] for o in engine.step()]
    streamed = "".join(d.text for d in deltas)
    assert streamed == full.text[:start], "no part of the stop string may leak, streamed or final"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop
    assert engine.kv_cache_manager.usage == 0


def test_max_tokens_is_exact_and_finishes_with_length(engine):
    out = run(engine, {"m": PROMPT}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))["m"].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_eos_stops_with_reason_stop_and_stays_out_of_the_text(engine, tokenizer, skip_special_tokens):
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    params = SamplingParams(temperature=0, max_tokens=64, skip_special_tokens=skip_special_tokens)
    out = run(engine, {"eos": chat}, params)["eos"].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.eos_token_ids
    assert out.text == tokenizer.decode(out.token_ids[:-1], skip_special_tokens=skip_special_tokens)
    assert "<|im_end|>" not in out.text


def test_stop_token_ids_end_the_choice(engine, hf_model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    expected = hf_greedy(hf_model, ids, 10)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[expected[3]])
    out = run(engine, {"st": ids}, params)["st"].outputs[0]
    cut = expected.index(expected[3]) + 1
    assert out.token_ids == expected[:cut] and out.finish_reason == "stop" and out.stop_reason == expected[3]
    assert out.text == tokenizer.decode(expected[:cut - 1]), "the stop token is not part of the text"


def test_logprobs_match_transformers(engine, hf_model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    out = run(engine, {"lp": ids}, SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))["lp"].outputs[0]
    reference = hf_logprobs(hf_model, ids, out.token_ids)
    for token_id, entry, ref in zip(out.token_ids, out.logprobs, reference):
        top_ids = ref.topk(3).indices.tolist()
        assert set(top_ids) | {token_id} == set(entry)
        for tid, value in entry.items():
            assert value == pytest.approx(ref[tid].item(), abs=1e-4)


def test_prompt_logprobs_survive_chunked_prefill_preemption_and_forks(hf_model, tokenizer):
    """Prefill in 8-token chunks, a cache too small for both requests (the newer, which asks for prompt logprobs,
    is preempted and recomputed): its prompt logprobs are still one per prompt token, as transformers has them."""
    engine = EngineCore(EngineConfig(device="cpu", dtype="float32", kernel_backend="torch", block_size=16,
                                     max_num_batched_tokens=8, num_gpu_blocks_override=4))
    ids = tokenizer.encode(PROMPT)
    assert 16 < len(ids) < 32, "each request must hold two blocks after its prompt and need a third while decoding"
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    out = run(engine, {"first": ids, "second": ids},
              [params, dataclasses.replace(params, prompt_logprobs=1)])["second"]
    assert engine.scheduler.num_preemptions > 0
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for position, token_id in enumerate(ids[1:], start=1):
        entry = out.prompt_logprobs[position]
        assert entry[token_id].logprob == pytest.approx(reference[position - 1, token_id].item(), abs=1e-4)
        assert entry[token_id].decoded_token == tokenizer.decode([token_id])
        best = reference[position - 1].argmax().item()
        assert entry[best].rank == 1


def test_choices_share_their_requests_prompt_logprobs(engine):
    out = run(engine, {"forks": PROMPT}, SamplingParams(n=3, temperature=1.0, max_tokens=2, prompt_logprobs=0))["forks"]
    assert len(out.outputs) == 3 and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(len(position) == 1 for position in out.prompt_logprobs[1:])


def test_logit_bias_and_top_k_shape_the_distribution(engine, tokenizer):
    forced = tokenizer.encode(" banana")[0]
    out = run(engine, {"b": PROMPT}, SamplingParams(temperature=1.0, max_tokens=3, logit_bias={forced: 100}, ignore_eos=True))
    assert out["b"].outputs[0].token_ids == [forced] * 3
    greedy = run(engine, {"g": PROMPT}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))["g"]
    top1 = run(engine, {"k": PROMPT}, SamplingParams(temperature=1.0, top_k=1, max_tokens=6, ignore_eos=True))["k"]
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_abort_returns_blocks_at_once(engine):
    engine.add_request("gone", PROMPT * 4, SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    engine.add_request("stays", PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for _ in range(3):
        engine.step()
    held = engine.kv_cache_manager.pool.num_blocks - engine.kv_cache_manager.pool.num_free_blocks
    engine.abort_request("gone")
    assert engine.kv_cache_manager.pool.num_blocks - engine.kv_cache_manager.pool.num_free_blocks < held
    assert not any(r.startswith("gone") for r in engine.scheduler.requests)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["stays"] and len(finished[0].outputs[0].token_ids) == 6
    assert engine.kv_cache_manager.usage == 0


def test_over_long_request_is_rejected_with_both_numbers(engine):
    with pytest.raises(ValueError, match=r"maximum context length is 8192 tokens.*\b8200\b"):
        engine.add_request("long", [1] * 200, SamplingParams(max_tokens=8000))
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.add_request("empty", [], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_request_larger_than_the_whole_cache_is_rejected():
    small = EngineCore(EngineConfig(device="cpu", dtype="float32", num_gpu_blocks_override=4, block_size=16))
    with pytest.raises(ValueError, match="KV-cache blocks"):
        small.add_request("big", [1] * 60, SamplingParams(max_tokens=10))


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("n", 0), ("max_tokens", 0),
                                         ("logprobs", 50), ("presence_penalty", 3), ("min_p", 2), ("stop", [""])])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_penalties_change_greedy_output_away_from_repeats(engine):
    plain = run(engine, {"p0": "1, 1, 1, 1, 1,"}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))["p0"]
    penalised = run(engine, {"p1": "1, 1, 1, 1, 1,"},
                    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=2.0,
                                   frequency_penalty=1.5))["p1"]
    assert plain.outputs[0].token_ids != penalised.outputs[0].token_ids


@pytest.mark.parametrize("params,field", [(SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
                                          (SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
                                          (SamplingParams(top_k=10**30), "top_k"),
                                          (SamplingParams(n=10**5), "n")])
def test_token_ids_outside_the_vocabulary_and_huge_top_k_or_n_are_rejected_up_front(engine, params, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        engine.add_request("bad", PROMPT, params)
    assert not engine.has_unfinished_requests()


def test_forks_count_against_max_num_seqs(tokenizer):
    small = EngineCore(EngineConfig(device="cpu", dtype="float32", max_num_seqs=4))
    small.add_request("a", PROMPT, SamplingParams(n=3, max_tokens=4, ignore_eos=True))
    small.add_request("b", PROMPT, SamplingParams(n=3, max_tokens=4, ignore_eos=True))
    peak = 0
    while small.has_unfinished_requests():
        small.step()
        peak = max(peak, len(small.scheduler.running))
    assert peak == 3


def test_a_request_id_that_collides_with_another_requests_choices_is_rejected(engine):
    engine.add_request("A", PROMPT, SamplingParams(n=2, max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("A-0", PROMPT, SamplingParams(max_tokens=2))
    engine.abort_request("A")
    engine.add_request("B-1", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("B", PROMPT, SamplingParams(n=2, max_tokens=2))
    engine.abort_request("B-1")
    assert not engine.has_unfinished_requests() and engine.kv_cache_manager.usage == 0
