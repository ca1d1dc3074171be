"""One tool call written as a JSON object, {"name": ..., "arguments" (or "parameters"): ...}, read as it arrives.

The scanner tracks only what streaming needs: nesting, strings, and where the values of the object's own keys
begin and end. So the name is known the moment its value ends, and the arguments can be handed on as slices of
the model's own text before the object closes, in whatever key order and spacing the model wrote.
"""
from __future__ import annotations

import json

_SPACE = " \t\r\n"
_ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3 writes "parameters", the others "arguments"


class JsonCallScanner:
    def __init__(self) -> None:
        self.text = ""  # the object's text read so far
        self.name: str | None = None
        self.done = False  # the object closed, or the text did not begin with one
        self.is_object = True  # False: the text did not begin with "{"
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._expect = "key"  # at the top level: "key", "colon", "value", or "end" (inside or after a value)
        self._key: str | None = None
        self._key_start = 0
        self._value_start = 0
        self._arguments_start: int | None = None
        self._arguments_end: int | None = None

    @property
    def arguments(self) -> str | None:
        """The arguments' text so far, None before they begin. Trailing spaces wait: they may end the value."""
        if self._arguments_start is None:
            return None
        return self.text[self._arguments_start:self._arguments_end].rstrip(_SPACE)

    def feed(self, text: str) -> int:
        """Reads text up to the end of the object; returns how many characters were part of it."""
        start = len(self.text)
        self.text += text  # positions index it while reading; cut back to what was used after
        used = 0
        for used, char in enumerate(text, 1):
            self._read(char, start + used - 1)
            if self.done:
                break
        used = used if self.is_object else 0
        self.text = self.text[:start + used]
        return used

    def _read(self, char: str, pos: int) -> None:
        if self._in_string:
            self._read_string(char, pos)
        elif char in _SPACE:
            return
        elif self._depth == 0:
            self._depth = 1
            self.is_object = char == "{"
            self.done = not self.is_object
        elif self._depth == 1 and self._expect != "end":
            self._read_top_level(char, pos)
        elif self._depth == 1 and char in ",}":
            self._end_value(pos)
            self._expect = "key"
            self.done = char == "}"
        else:
            self._read_value(char)

    def _read_top_level(self, char: str, pos: int) -> None:
        if self._expect == "key" and char == '"':
            self._in_string, self._key_start = True, pos
        elif self._expect == "key" and char == "}":
            self.done = True
        elif self._expect == "colon" and char == ":":
            self._expect = "value"
        elif self._expect == "value":
            self._expect, self._value_start = "end", pos
            if self._key in _ARGUMENT_KEYS and self._arguments_start is None:
                self._arguments_start = pos
            self._read_value(char)

    def _read_value(self, char: str) -> None:
        if char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1

    def _read_string(self, char: str, pos: int) -> None:
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            self._in_string = False
            if self._depth == 1 and self._expect == "key":
                self._key = _loads(self.text[self._key_start:pos + 1])
                self._expect = "colon"

    def _end_value(self, pos: int) -> None:
        if self._arguments_start == self._value_start and self._arguments_end is None:
            self._arguments_end = pos
        elif self._key == "name" and self.name is None:
            name = _loads(self.text[self._value_start:pos])
            self.name = name if isinstance(name, str) and name else None


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None
