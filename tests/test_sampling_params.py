"""SamplingParams refuses every out-of-range value with a ValueError naming the field, and clamps logit_bias."""
from __future__ import annotations

import math

import pytest

from engine.sampling_params import SamplingParams

VOCAB = 1000
REAL_FIELDS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]


@pytest.mark.parametrize("field", REAL_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e39])  # 1e39 is inf in the sampler's float32
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", ["n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs"])
def test_booleans_and_floats_are_no_integers(field):
    for value in (True, 2.0):
        with pytest.raises(ValueError, match=f"^{field} must be an integer"):
            SamplingParams(**{field: value})


def test_seed_is_a_signed_64_bit_integer():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    for seed in (2**63, 2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=rf"^seed must be an integer in \[{-(2**63)}, {2**63 - 1}\], got {seed}$"):
            SamplingParams(seed=seed)


def test_top_k_is_off_at_minus_one_or_zero_and_bounded_by_the_vocabulary():
    assert SamplingParams(top_k=-1).top_k == 0
    SamplingParams(top_k=VOCAB).check_vocab(VOCAB)
    with pytest.raises(ValueError, match="^top_k must be an integer >= -1, got -2"):
        SamplingParams(top_k=-2)
    for top_k in (VOCAB + 1, 10**30):
        with pytest.raises(ValueError, match=rf"^top_k must be -1, 0 \(off\) or in \[1, {VOCAB}\], got {top_k}$"):
            SamplingParams(top_k=top_k).check_vocab(VOCAB)


def test_logit_bias_is_clamped_to_plus_minus_100_and_keys_may_be_decimal_strings():
    params = SamplingParams(logit_bias={"5": 1e6, 7: -1e300, 9: 2.5})
    assert params.logit_bias == {5: 100.0, 7: -100.0, 9: 2.5}


@pytest.mark.parametrize(("bias", "message"), [
    ({5: math.nan}, "logit_bias values must be finite numbers, got nan"),
    ({5: math.inf}, "logit_bias values must be finite numbers, got inf"),
    ({5: "1"}, "logit_bias values must be finite numbers, got '1'"),
    ({"x": 1}, "logit_bias keys must be token ids, got 'x'"),
    ({"-5": 1}, "logit_bias keys must be token ids, got '-5'"),
    ({"9" * 5000: 1}, "logit_bias keys must be token ids, got '999"),  # int() of it would raise its own error
    ([1, 2], "logit_bias must map token ids to numbers"),
])
def test_bad_logit_bias_is_refused_saying_what_is_wrong(bias, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        SamplingParams(logit_bias=bias)


@pytest.mark.parametrize(("field", "ids", "bad"), [
    ("logit_bias", {3: 1.0, VOCAB: 1.0}, VOCAB), ("logit_bias", {-1: 1.0}, -1),
    ("stop_token_ids", [3, 99999], 99999), ("stop_token_ids", [-4], -4),
])
def test_token_ids_outside_the_vocabulary_are_named(field, ids, bad):
    params = SamplingParams(**{field: ids})
    with pytest.raises(ValueError, match=rf"^{field} token id {bad} is out of range \[0, {VOCAB}\)$"):
        params.check_vocab(VOCAB)


@pytest.mark.parametrize(("field", "value"), [("stop", 5), ("stop_token_ids", 5), ("stop_token_ids", [True])])
def test_stop_settings_of_the_wrong_type_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})
