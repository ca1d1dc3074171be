"""The xgrammar backend: grammars compiled against the tokenizer's vocabulary and cached by what the request
asked for, one matcher per sequence, and the batch's allowed-token bitmasks filled on xgrammar's threads."""
from __future__ import annotations

import functools
import json
import re

import torch
import xgrammar as xgr

from engine.structured_output.params import StructuredOutputsParams

# xgrammar's errors start with where in its C++ they were raised: "[21:47:36] /project/cpp/x.cc:83: message".
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")
_NAMES = {"json": "JSON schema", "json_object": "JSON grammar", "regex": "regex", "choice": "choice",
          "grammar": "EBNF grammar"}
COMPILED_CACHE_SIZE = 1024  # grammars kept compiled; a compile of a nested schema takes milliseconds


class XGrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_token_ids)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # compile() caches whole requests
        self.batch = xgr.BatchGrammarMatcher()
        self.vocab_size = vocab_size
        self.compile = functools.lru_cache(maxsize=COMPILED_CACHE_SIZE)(self._compile)

    @staticmethod
    def check(params: StructuredOutputsParams) -> None:
        """Parses what the request gave, without the tokenizer (milliseconds); a ValueError says what is wrong."""
        grammar_of(params)

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(grammar_of(params))

    def new_matcher(self, grammar: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(grammar)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(num_rows, self.vocab_size)

    def fill_bitmask(self, matchers: list[xgr.GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def grammar_of(params: StructuredOutputsParams) -> xgr.Grammar:
    try:
        if params.json is not None:
            # Compact JSON: with free whitespace a small model can pad forever instead of writing values.
            return xgr.Grammar.from_json_schema(params.json, any_whitespace=False)
        if params.json_object:  # an object, as the name says (xgrammar's builtin JSON grammar also takes arrays)
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=True)
        if params.regex is not None:
            return xgr.Grammar.from_regex(params.regex)
        if params.choice is not None:  # EBNF string literals escape as JSON strings do
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(choice) for choice in params.choice))
        return xgr.Grammar.from_ebnf(params.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"invalid {_NAMES[params.kind]}: {_SOURCE_PREFIX.sub('', str(e)).strip()}") from None
