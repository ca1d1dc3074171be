"""What a request asks its output to match, as vLLM's StructuredOutputsParams: exactly one of a JSON schema, any
JSON object, a regular expression, one of a list of strings, or an EBNF grammar."""
from __future__ import annotations

import json
from dataclasses import dataclass

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (an object, or its JSON text)
    json_object: bool | None = None  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None  # EBNF, as xgrammar and llama.cpp read it

    def __post_init__(self) -> None:
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(_KINDS)}, got {given or 'none'}")
        if self.choice is not None:
            if not (isinstance(self.choice, (list, tuple)) and self.choice and all(isinstance(c, str) for c in self.choice)):
                raise ValueError("structured_outputs choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, dict):  # its text is the grammar cache's key
            object.__setattr__(self, "json", json.dumps(self.json))  # key order is the order of the output
        for kind in ("json", "regex", "grammar"):
            if getattr(self, kind) is not None and not isinstance(getattr(self, kind), str):
                raise ValueError(f"structured_outputs {kind} must be a string")

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))
