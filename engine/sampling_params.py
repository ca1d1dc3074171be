"""Per-request generation settings, named and validated as in vLLM."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from engine.structured_output.params import StructuredOutputsParams

# The sampler computes in float32: a larger Python float becomes inf there, and inf - inf or 0 * inf is NaN.
_FLOAT32_MAX = 3.4028234663852886e38
_INT64 = (-(2**63), 2**63 - 1)  # seed's range, as vLLM's
_LOGIT_BIAS_LIMIT = 100.0  # OpenAI's documented range; a larger bias is clamped to it (as vLLM does)

# Real-valued fields: (lowest, highest, whether lowest itself is excluded); each must also be finite in float32.
_REAL_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0, math.inf, False), "top_p": (0, 1, True), "min_p": (0, 1, False),
    "presence_penalty": (-2, 2, False), "frequency_penalty": (-2, 2, False), "repetition_penalty": (0, math.inf, True),
}
# Integer fields: (lowest, highest); those in _OPTIONAL may also be None. top_k: -1 and 0 both mean off.
_INT_RANGES: dict[str, tuple[int, float]] = {
    "n": (1, math.inf), "top_k": (-1, math.inf), "seed": _INT64, "max_tokens": (1, math.inf),
    "min_tokens": (0, math.inf), "logprobs": (0, 20), "prompt_logprobs": (-1, math.inf),
    "truncate_prompt_tokens": (-1, math.inf),
}
_OPTIONAL = frozenset({"seed", "max_tokens", "logprobs", "prompt_logprobs", "truncate_prompt_tokens"})


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries all text so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # values are clamped to [-100, 100]
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs besides the sampled token's
    prompt_logprobs: int | None = None  # per prompt token: its logprob and this many top ones; -1: the whole vocabulary
    allowed_token_ids: list[int] | None = None  # sample only among these
    bad_words: list[str] | None = None  # words never generated (as vLLM: with and without a leading space)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Only slow (Python) tokenizers put spaces between special tokens; fast ones, which TokModel uses, never do.
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens; -1: max_model_len
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must match
    # Filled by the engine: the model's end tokens, unless ignore_eos.
    eos_token_ids: frozenset[int] = field(default=frozenset(), repr=False)
    # Filled by the engine: each bad word's token ids (bad_words_token_ids in engine/logits_processors.py).
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else _as_list(self.stop, "stop")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids")
        self.bad_words = _as_list(self.bad_words, "bad_words")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_list(self.allowed_token_ids, "allowed_token_ids")
        self._validate()
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = _logit_bias(self.logit_bias)

    def _validate(self) -> None:
        for name, (low, high, low_excluded) in _REAL_RANGES.items():
            _check_real(name, getattr(self, name), low, high, low_excluded)
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if not (value is None and name in _OPTIONAL):
                _check_int(name, value, low, high)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be a non-empty string or a list of non-empty strings")
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name) or []
            bad = next((i for i in ids if not _is_int(i)), None)
            _check(bad is None, name, f"must be a list of integer token ids, got {_show(bad)}")
        _check(self.allowed_token_ids != [], "allowed_token_ids", "must not be empty")
        _check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
               "must be a list of non-blank strings")
        _check(self.truncate_prompt_tokens != 0, "truncate_prompt_tokens", "must be -1 or an integer >= 1, got 0")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", f"must be a StructuredOutputsParams, got {_show(self.structured_outputs)}")

    def check_vocab(self, vocab_size: int) -> None:
        """What only the model can bound: top_k and the token ids of logit_bias and stop_token_ids.
        Raises ValueError naming the field and the offending value."""
        _check(self.top_k <= vocab_size, "top_k", f"must be -1, 0 (off) or in [1, {vocab_size}], got {self.top_k}")
        for name, ids in (("logit_bias", list(self.logit_bias or ())), ("stop_token_ids", self.stop_token_ids),
                          ("allowed_token_ids", self.allowed_token_ids)):
            check_token_ids(name, ids, vocab_size)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def check_token_ids(name: str, ids: list[int], vocab_size: int) -> None:
    """Raises ValueError naming the field and its first id outside the vocabulary (max and min: C speed)."""
    if not ids:
        return
    bad = max(ids) if max(ids) >= vocab_size else min(ids) if min(ids) < 0 else None
    _check(bad is None, name, f"token id {bad} is out of range [0, {vocab_size})")


def _logit_bias(bias: object) -> dict[int, float] | None:
    """Token ids (ints, or decimal strings as JSON object keys are) to finite biases clamped to [-100, 100]."""
    if bias is None:
        return None
    _check(isinstance(bias, dict), "logit_bias", f"must map token ids to numbers, got {_show(bias)}")
    clamped = {}
    for key, value in bias.items():
        # Over 18 digits no id is in any vocabulary, and int() of thousands of digits raises its own error.
        is_id = _is_int(key) or (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 18)
        _check(is_id, "logit_bias", f"keys must be token ids, got {_show(key)}")
        # Any finite value will do (it is clamped), an int past float's range included: no float() before clamping.
        is_finite = _is_number(value) and abs(value) < math.inf
        _check(is_finite, "logit_bias", f"values must be finite numbers, got {_show(value)}")
        clamped[int(key)] = float(min(max(value, -_LOGIT_BIAS_LIMIT), _LOGIT_BIAS_LIMIT))
    return clamped


def _as_list(value: object, name: str) -> list:
    _check(value is None or isinstance(value, (list, tuple)), name, f"must be a list, got {_show(value)}")
    return list(value or [])


def _check_real(name: str, value: object, low: float, high: float, low_excluded: bool) -> None:
    in_range = _is_finite(value) and (value > low if low_excluded else value >= low) and value <= high
    if high == math.inf:
        wanted = f"a finite number {'>' if low_excluded else '>='} {low}"
    else:
        wanted = f"a number in {'(' if low_excluded else '['}{low}, {high}]"
    _check(in_range, name, f"must be {wanted}, got {_show(value)}")


def _check_int(name: str, value: object, low: int, high: float) -> None:
    wanted = f"an integer >= {low}" if high == math.inf else f"an integer in [{low}, {high}]"
    _check(_is_int(value) and low <= value <= high, name, f"must be {wanted}, got {_show(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    """A number that stays finite in float32 (NaN fails every comparison)."""
    return _is_number(value) and abs(value) <= _FLOAT32_MAX


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
