"""use_beam_search on chat and completions, as vLLM: n is the beam width and length_penalty ranks the finished
beams (engine/beam_search.py). Settings that a beam search has nothing to act on are refused with a 400."""
from __future__ import annotations

from engine.beam_search import BeamSearchParams
from engine.sampling_params import SamplingParams
from server.errors import bad_request
from server.structured_outputs import FIELDS as STRUCTURED_OUTPUT_FIELDS

# Beams follow the logprobs, nothing is sampled; they end at an end token or max_tokens.
_UNSUPPORTED = ("top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "logit_bias", "min_tokens", "stop", "stop_token_ids")
_DEFAULTS = SamplingParams()


def beam_search_params(body: dict, params: SamplingParams) -> BeamSearchParams | None:
    """The request's beam search, or None when it asks for none; a 400 naming the field it cannot honour."""
    length_penalty = body.get("length_penalty")
    if not body.get("use_beam_search"):
        if length_penalty not in (None, 1):
            raise bad_request("length_penalty applies only with use_beam_search", param="length_penalty")
        return None
    if body.get("temperature"):
        raise bad_request("temperature must be 0 with use_beam_search: beams follow the logprobs, nothing is sampled",
                          param="temperature")
    unsupported = [name for name in _UNSUPPORTED if getattr(params, name) != getattr(_DEFAULTS, name)]
    if params.structured_outputs is not None:  # from a structured-outputs field, or else from tool_choice
        named = [name for name in STRUCTURED_OUTPUT_FIELDS if body.get(name) is not None]
        unsupported.append(named[0] if named else "tool_choice")
    if unsupported:
        raise bad_request(f"{unsupported[0]} is not supported with use_beam_search", param=unsupported[0])
    try:
        return BeamSearchParams(params.n, params.max_tokens, params.ignore_eos, 0.0,
                                1.0 if length_penalty is None else length_penalty, params.skip_special_tokens,
                                params.logprobs)
    except ValueError as e:
        raise bad_request(f"n (the beam width) {str(e).removeprefix('beam_width ')}", param="n") from None
