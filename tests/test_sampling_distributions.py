"""The sampler draws from exactly the distribution its settings define. For each of top_k, top_p, min_p, the
penalties and all of them together, many draws (a batch of identical rows, sampled several times) are compared
with the distribution computed the straightforward way (float64, a full sort, a loop over the vocabulary): a
chi-square test on the kept tokens, and no draw at all of a token the settings drop. Each case runs with the
default candidates (wider than this vocabulary: every row is sampled from its candidates) and with 4 (the
kept tokens reach past them: the whole-row path, with its rejection loop for top_p)."""
from __future__ import annotations

import math

import pytest
import torch

from engine import random_sampling
from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams

VOCAB = 512  # 8 chunks of 64 (vocab_chunks.py): the two-step top-k and draw are exercised too
BATCH = 500  # rows per call: small ops stay on one thread, which a busy machine does not stall
NUM_DRAWS = 20_000
PROMPT = [1, 2, 3, 3]
OUTPUT = [3, 4, 4, 5, 20]


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of small ops: on a shared 2-core machine each parallel one waits for a descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits_with_values(values: list[float]) -> torch.Tensor:
    """`values` (largest first) spread over the vocabulary in a fixed shuffled order, the rest well below them."""
    order = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))
    logits = torch.linspace(-4.0, -8.0, VOCAB)
    logits[: len(values)] = torch.tensor(values)
    return logits[order.argsort()]


TIED_AT_FIFTH = logits_with_values([4.0, 3.5, 3.0, 2.5, 2.0, 2.0, 2.0, 1.5, 1.0])
FLAT = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2)) * 0.5
PEAKED = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 2.0
TIED_AT_NUCLEUS_EDGE = logits_with_values([3.0, 2.0, 2.0, 2.0, 1.0, 1.0])


def reference_probs(logits: torch.Tensor, params: SamplingParams, request: Request) -> torch.Tensor:
    """vLLM's order: bias and min_tokens, penalties, temperature, min_p, top_k, top_p (ties kept, as the
    sampler's thresholds keep them)."""
    x = logits.double().clone()
    for token, bias in (params.logit_bias or {}).items():
        x[token] += bias
    if request.num_output_tokens < params.min_tokens:
        x[[*params.stop_token_ids, *params.eos_token_ids]] = -math.inf
    counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long), minlength=VOCAB).double()
    seen = counts > 0
    seen[torch.tensor(request.prompt_token_ids)] = True
    x = torch.where(seen, torch.where(x > 0, x / params.repetition_penalty, x * params.repetition_penalty), x)
    x = x - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    probs = torch.softmax(x / params.temperature, dim=0)
    probs[probs < params.min_p * probs.max()] = 0
    if params.top_k:
        probs[x < x.sort(descending=True).values[params.top_k - 1]] = 0
    probs /= probs.sum()
    mass_above = torch.tensor([probs[probs > p].sum() for p in probs])
    probs[mass_above >= params.top_p] = 0
    return probs / probs.sum()


def make_request(index: int, params: SamplingParams) -> Request:
    """A choice `index` of one request: seeded, each index draws from its own stream (seed + index)."""
    request = Request(f"r-{index}", "r", index, PROMPT, params, max_tokens=100)
    for token in OUTPUT:
        request.append_token(token)
    return request


def draw_counts(logits: torch.Tensor, params: SamplingParams, candidates: int) -> torch.Tensor:
    """Token counts of NUM_DRAWS draws. Seeded, each draw is by a choice of its own (a seeded choice sampled
    again at the same position repeats its draw)."""
    torch.manual_seed(0)
    sampler, counts = Sampler(candidates), torch.zeros(VOCAB)
    requests = [make_request(i, params) for i in range(BATCH)]
    for batch in range(NUM_DRAWS // BATCH):
        if params.seed is not None:
            requests = [make_request(batch * BATCH + i, params) for i in range(BATCH)]
        tokens = sampler(logits.expand(BATCH, VOCAB).clone(), requests).token_ids
        counts += torch.bincount(torch.tensor(tokens), minlength=VOCAB)
    return counts


def chi_square_limit(dof: int) -> float:
    """The chi-square statistic exceeded with probability ~1e-6 (Wilson-Hilferty): a false alarm is that rare."""
    z = 4.75
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_same_distribution(counts: torch.Tensor, probs: torch.Tensor) -> None:
    dropped = probs == 0
    assert counts[dropped].sum() == 0, f"drew dropped tokens {dropped.nonzero()[:, 0][counts[dropped] > 0].tolist()}"
    expected = probs * counts.sum()
    small = (expected < 5) & ~dropped  # pooled into one bin, as chi-square wants expected counts of 5 or more
    observed = torch.cat([counts[~dropped & ~small], counts[small].sum()[None]]).double()
    expected = torch.cat([expected[~dropped & ~small], expected[small].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum().item()
    dof = max(len(expected) - 1, 1)
    assert statistic < chi_square_limit(dof), (statistic, dof, counts.tolist(), expected.tolist())


CASES = {
    "top_k with ties at the k-th": (TIED_AT_FIFTH, SamplingParams(top_k=5)),
    "top_p, a nucleus wider than the candidates": (FLAT, SamplingParams(top_p=0.9)),
    "top_p with ties at the nucleus edge": (TIED_AT_NUCLEUS_EDGE, SamplingParams(top_p=0.5)),
    "min_p": (PEAKED, SamplingParams(min_p=0.1)),
    "temperature alone": (PEAKED, SamplingParams(temperature=1.3)),
    "penalties": (PEAKED, SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.6)),
    "everything, seeded": (PEAKED, SamplingParams(
        temperature=0.7, top_k=12, top_p=0.8, min_p=0.02, repetition_penalty=1.2, frequency_penalty=0.3,
        presence_penalty=0.2, logit_bias={9: 2.5, 10: -100}, min_tokens=8, stop_token_ids=[11],
        eos_token_ids=frozenset({12}), seed=0)),
}


@pytest.mark.parametrize("candidates", [random_sampling.CANDIDATES, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_sampled_distribution_matches_the_reference(case, candidates):
    logits, params = CASES[case]
    probs = reference_probs(logits, params, make_request(0, params))
    assert_same_distribution(draw_counts(logits, params, candidates), probs)


def test_a_top_k_past_the_candidates_bound_is_served_over_the_whole_row(monkeypatch):
    monkeypatch.setattr(random_sampling, "MAX_TOP_K_CANDIDATES", 6)
    params = SamplingParams(top_k=20, temperature=0.5)
    probs = reference_probs(FLAT, params, make_request(0, params))
    assert_same_distribution(draw_counts(FLAT, params, candidates=4), probs)


def test_the_cases_reach_what_they_are_named_for():
    """The reference keeps a whole tie group that a sort would cut, and a nucleus wider than 4 candidates."""
    tied = reference_probs(TIED_AT_FIFTH, SamplingParams(top_k=5), make_request(0, SamplingParams()))
    assert (tied > 0).sum() == 7
    edge = reference_probs(TIED_AT_NUCLEUS_EDGE, SamplingParams(top_p=0.5), make_request(0, SamplingParams()))
    assert (edge > 0).sum() == 4
    assert (reference_probs(FLAT, SamplingParams(top_p=0.9), make_request(0, SamplingParams())) > 0).sum() > 4
