"""Beam search (use_beam_search, LLM.beam_search) against transformers' beam search on the default model, offline
and through the server with the openai client; the beams share their prompt's KV blocks.

Where the two definitions coincide: vLLM's (which TokModel follows) and transformers' both keep, at each step,
the beam_width continuations with the highest cumulative logprob. They differ only in how beams that end early
are treated: a beam ending in EOS is scored cum_logprob / length ** length_penalty with the prompt in the length
(vLLM) or not (transformers), transformers keeps it only if it ranks among the best beam_width candidates of its
step, and early_stopping may end transformers' search before max_tokens. With EOS out of play (ignore_eos here,
eos_token_id=None there), every beam runs to max_tokens: all finished beams have the same length, so the length
penalty divides every score by the same number, early stopping never triggers, and the two searches agree."""
from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.beam_search import BeamSearchParams, get_beam_search_score
from server_fixtures import Server, leaves_server_idle, openai_client, running_server  # noqa: F401 (autouse)

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
BEAM_WIDTH, MAX_TOKENS, LENGTH_PENALTY = 3, 4, 0.7
LONG_PROMPT = "Once upon a time, in a land far away, there lived a wise old owl who knew every story. " * 3


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", max_model_len=512)


@pytest.fixture(scope="module")
def server() -> Server:
    with running_server("--dtype", "float32", "--max-model-len", "512") as s:
        yield s


def transformers_beams(hf_model, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """The output token ids of transformers' beams, best first."""
    out = hf_model.generate(torch.tensor([prompt_ids]), num_beams=BEAM_WIDTH, num_return_sequences=BEAM_WIDTH,
                            do_sample=False, max_new_tokens=max_tokens, length_penalty=LENGTH_PENALTY,
                            early_stopping=True, eos_token_id=None, pad_token_id=0)
    return [row[len(prompt_ids):] for row in out.tolist()]


@pytest.fixture(scope="module")
def expected(hf_model, tokenizer) -> list[list[list[int]]]:
    return [transformers_beams(hf_model, tokenizer.encode(prompt)) for prompt in PROMPTS]


def test_offline_beams_match_transformers(llm, expected):
    params = BeamSearchParams(beam_width=BEAM_WIDTH, max_tokens=MAX_TOKENS, ignore_eos=True,
                              length_penalty=LENGTH_PENALTY)
    outputs = llm.beam_search([{"prompt": prompt} for prompt in PROMPTS], params)
    tokenizer = llm.get_tokenizer()
    for output, beams in zip(outputs, expected):
        prompt_len = len(output.sequences[0].tokens) - MAX_TOKENS
        assert [seq.tokens[prompt_len:] for seq in output.sequences] == beams
        assert [seq.text for seq in output.sequences] == [tokenizer.decode(beam) for beam in beams]
        assert all(seq.finish_reason == "length" for seq in output.sequences)
        scores = [get_beam_search_score(seq.tokens, seq.cum_logprob, LENGTH_PENALTY) for seq in output.sequences]
        assert scores == sorted(scores, reverse=True)
        # Each step's logprobs are the 2 * beam_width likeliest tokens, the beam's own among them.
        for seq in output.sequences:
            assert all(len(step) >= 2 * BEAM_WIDTH and token in step
                       for token, step in zip(seq.tokens[prompt_len:], seq.logprobs))
            output_logprobs = [step[token] for token, step in zip(seq.tokens[prompt_len:], seq.logprobs)]
            assert seq.cum_logprob == pytest.approx(sum(output_logprobs))


def test_beams_share_their_prompts_kv_blocks(llm):
    """Every step after the first finds the prompt's full blocks in the prefix cache: the beams hold them by
    reference instead of computing them again; nothing is held once the search ends."""
    engine = llm.engine
    prompt_len = len(llm.get_tokenizer().encode(LONG_PROMPT))
    full_block_tokens = prompt_len // engine.config.block_size * engine.config.block_size
    assert full_block_tokens >= 3 * engine.config.block_size
    before = engine.get_stats()
    llm.beam_search([LONG_PROMPT], BeamSearchParams(beam_width=2, max_tokens=2, ignore_eos=True))
    after = engine.get_stats()
    beam_requests_after_the_first_step = 2
    assert after.prefix_cache_hits - before.prefix_cache_hits >= beam_requests_after_the_first_step * full_block_tokens
    assert after.kv_cache_usage == 0.0
    engine.kv_cache_manager.pool.check_integrity()


def test_a_beam_that_ends_in_eos_is_complete_and_ranked_by_its_score(llm, tokenizer):
    """vLLM's ranking: complete beams (their end token not in the output) and live ones by
    cum_logprob / len(prompt + output) ** length_penalty."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer with just the number."}],
                                           add_generation_prompt=True, tokenize=False) + "The answer is 4"
    (output,) = llm.beam_search([{"prompt_token_ids": tokenizer.encode(prompt)}],
                                BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=1.0))
    stopped = [seq for seq in output.sequences if seq.finish_reason == "stop"]
    assert stopped, [seq.text for seq in output.sequences]
    for seq in stopped:
        assert seq.stop_reason in llm.engine.eos_token_ids and seq.stop_reason not in seq.tokens[-1:]
        assert "<|im_end|>" not in seq.text
    scores = [get_beam_search_score(seq.tokens, seq.cum_logprob, 1.0) for seq in output.sequences]
    assert scores == sorted(scores, reverse=True)


def test_server_completions_beams_match_transformers(server, expected, tokenizer):
    client = openai_client(server)
    model = client.models.list().data[0].id
    request = dict(model=model, prompt=PROMPTS, n=BEAM_WIDTH, max_tokens=MAX_TOKENS, temperature=0.0,
                   extra_body={"use_beam_search": True, "length_penalty": LENGTH_PENALTY, "ignore_eos": True})
    response = client.completions.create(**request)
    texts = [[tokenizer.decode(beam) for beam in beams] for beams in expected]
    assert [choice.text for choice in response.choices] == [text for beams in texts for text in beams]
    assert {choice.finish_reason for choice in response.choices} == {"length"}
    assert response.usage.completion_tokens == len(PROMPTS) * BEAM_WIDTH * MAX_TOKENS
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(len(response.choices))] == [choice.text for choice in response.choices]


def test_server_chat_beams_match_transformers(server, hf_model, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    client = openai_client(server)
    response = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=messages, n=BEAM_WIDTH, max_tokens=3, logprobs=True,
        top_logprobs=2, extra_body={"use_beam_search": True, "length_penalty": LENGTH_PENALTY, "ignore_eos": True})
    beams = transformers_beams(hf_model, prompt_ids, max_tokens=3)
    assert [choice.message.content for choice in response.choices] == [tokenizer.decode(b, skip_special_tokens=True)
                                                                       for b in beams]
    for choice, beam in zip(response.choices, beams):
        assert [entry.token for entry in choice.logprobs.content] == [tokenizer.decode([t]) for t in beam]
        assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 0.7}, "temperature"),
    ({"top_p": 0.5}, "top_p"),
    ({"stop": ["\n"]}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 11}, "n"),
    ({"use_beam_search": False, "length_penalty": 0.5}, "length_penalty"),
    ({"length_penalty": "long"}, "length_penalty"),
])
def test_what_a_beam_search_cannot_honour_is_a_400_naming_it(server, fields, param):
    body = {"prompt": "Hello", "max_tokens": 2, "use_beam_search": True, "n": 2} | fields
    response = server.post("/v1/completions", body)
    assert response.status == 400, response.body
    assert response.json()["error"]["param"] == param


def test_offline_beam_search_params_name_the_bad_field():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=11)
    with pytest.raises(ValueError, match="length_penalty"):
        BeamSearchParams(beam_width=2, length_penalty=float("nan"))
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)
