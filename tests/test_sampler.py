"""The sampler's bookkeeping: penalties kept incrementally per request equal a recount of the whole history,
seeded rows reproduce whatever else is in the batch, greedy rows are exact argmax, logprobs are of the raw
logits. (The sampled distributions themselves: test_sampling_distributions.py.)"""
from __future__ import annotations

import torch

from engine import vocab_chunks
from engine.penalties import apply_penalties
from engine.request import Request
from engine.row_random import DRAWS_PER_TOKEN, RowRandom, as_int64
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams

VOCAB = 50


def penalised_from_scratch(logits: torch.Tensor, request: Request) -> torch.Tensor:
    params = request.sampling_params
    counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long), minlength=VOCAB).float()
    seen = counts > 0
    seen[torch.tensor(request.prompt_token_ids)] = True
    rep = params.repetition_penalty
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def test_incremental_penalties_match_a_recount_of_the_history_every_step():
    torch.manual_seed(0)
    requests = [
        Request("a", "a", 0, [1, 2, 3], SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2), 40),
        Request("b", "b", 0, [4], SamplingParams(), 40),  # no penalties: its row must come out unchanged
        Request("c", "c", 0, [5, 5], SamplingParams(frequency_penalty=1.0), 40),
    ]
    for _ in range(30):  # past the first growth of the per-request arrays (16 distinct output tokens)
        logits = torch.randn(len(requests), VOCAB)
        out = logits.clone()
        apply_penalties(out, requests)
        for row, request in enumerate(requests):
            assert torch.allclose(out[row], penalised_from_scratch(logits[row], request))
        for request in requests:  # a small range, so outputs repeat and meet the prompt's tokens
            request.append_token(int(torch.randint(0, 8, ())))
    assert torch.equal(out[1], logits[1])


def splitmix64(state: int, n: int) -> int:
    """The reference: SplitMix64's n-th output (from 1) after `state`, in Python's unbounded ints."""
    mask = (1 << 64) - 1
    z = (state + n * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_seeded_uniforms_are_splitmix64_whatever_the_seed():
    """int64 tensor arithmetic must wrap exactly as the reference does, at the extreme seeds too."""
    seeds = [0, 1, 2**63 - 1, -(2**63), 12345]
    requests = [Request(f"s{i}", "s", index, [1], SamplingParams(seed=seed), 10)
                for i, (seed, index) in enumerate(zip(seeds, [0, 3, 1, 0, 2]))]
    for request in requests[:2]:
        request.append_token(7)
    uniforms = RowRandom(requests, torch.device("cpu")).uniform(draw=2)
    for request, uniform in zip(requests, uniforms.tolist()):
        key = as_int64(request.sampling_params.seed + request.index) & ((1 << 64) - 1)
        stream = splitmix64(key, 0)  # the stream starts at the mixed key
        n = request.num_output_tokens * DRAWS_PER_TOKEN + 3
        assert uniform == (splitmix64(stream, n) >> 11) * 2.0**-53


def test_seeded_rows_draw_the_same_tokens_whatever_else_is_in_the_batch():
    torch.manual_seed(0)
    flat = torch.randn(VOCAB) * 0.3  # top_p's nucleus wider than 4 candidates: the whole-row path too
    for params in (SamplingParams(seed=42, top_p=0.9), SamplingParams(seed=42, top_k=5, temperature=0.7)):
        seeded = [Request("s-0", "s", 0, [1, 2], params, 10), Request("s-1", "s", 1, [1, 2], params, 10)]
        for candidates in (64, 4):
            alone = [Sampler(candidates)(flat[None].clone(), [r]).token_ids[0] for r in seeded]
            others = [Request(f"o{i}", f"o{i}", 0, [3], SamplingParams(temperature=1.5), 10) for i in range(5)]
            batch = [others[0], seeded[1], *others[1:3], seeded[0], *others[3:]]
            mixed_logits = torch.randn(len(batch), VOCAB)
            mixed_logits[[1, 4]] = flat
            mixed = Sampler(candidates)(mixed_logits, batch).token_ids
            assert [mixed[4], mixed[1]] == alone


def test_seeded_choices_draw_from_streams_of_their_own():
    flat = torch.zeros(VOCAB)
    choices = [Request(f"s-{i}", "s", i, [1], SamplingParams(seed=7), 40) for i in range(2)]
    tokens = [[], []]
    for _ in range(20):
        for i, token in enumerate(Sampler()(flat.expand(2, VOCAB).clone(), choices).token_ids):
            tokens[i].append(token)
            choices[i].append_token(token)
    assert tokens[0] != tokens[1] and len(set(tokens[0])) > 5


def test_two_step_argmax_and_top_k_equal_torchs_with_many_ties():
    torch.manual_seed(0)
    logits = (torch.randn(64, 64 * 40) * 2).round()  # a few distinct values: ties everywhere, across chunks
    logits[3] = 1.0  # a row that is one tie
    for k in (1, 7, 33):
        values, ids = vocab_chunks.topk(logits, k)
        assert torch.equal(values, logits.topk(k, dim=-1).values) and torch.equal(logits.gather(1, ids), values)
        assert all(len(set(row)) == k for row in ids.tolist())
    assert torch.equal(vocab_chunks.argmax(logits), logits.argmax(dim=-1))


def test_greedy_rows_take_the_first_of_tied_maxima_beside_random_rows():
    logits = torch.randn(4, VOCAB)
    logits[0, [9, 3, 30]] = 10.0
    logits[2, [17, 40]] = 10.0
    requests = [Request(f"r{i}", f"r{i}", 0, [1], SamplingParams(temperature=0 if i % 2 == 0 else 1.0), 10)
                for i in range(4)]
    tokens = Sampler()(logits.clone(), requests).token_ids
    assert tokens[0] == 3 and tokens[2] == 17


def test_logprobs_are_of_the_raw_logits_before_bias_and_penalties():
    logits = torch.randn(2, VOCAB)
    params = SamplingParams(temperature=0, logprobs=3, logit_bias={5: 50.0}, repetition_penalty=2.0)
    requests = [Request("a", "a", 0, [1, 2], params, 10), Request("b", "b", 0, [1], SamplingParams(), 10)]
    out = Sampler()(logits.clone(), requests)
    raw = torch.log_softmax(logits[0], dim=-1)
    assert out.token_ids[0] == 5
    assert set(out.logprobs[0]) == {5, *raw.topk(3).indices.tolist()}
    for token_id, logprob in out.logprobs[0].items():
        assert logprob == raw[token_id].item()
    assert out.logprobs[1] == {}
