"""Responses created with `store: true`, in memory: what GET /v1/responses/{id} returns and what
`previous_response_id` continues. OpenAI keeps them for 30 days; a server's memory bounds them here, by count."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_MAX_STORED_RESPONSES = 1000


@dataclass
class StoredResponse:
    response: dict  # the Response object, as it was returned
    messages: list[dict]  # this turn's input and output as chat messages; not its instructions (OpenAI drops them)
    previous: StoredResponse | None  # the response this one continued; it stays alive as long as this one does

    @property
    def conversation(self) -> list[dict]:
        """Every turn's messages, the first turn's first, up to this response's output. Each turn holds only its
        own messages, so a long conversation costs its length once, not once per turn."""
        turns = []
        stored: StoredResponse | None = self
        while stored is not None:
            turns.append(stored.messages)
            stored = stored.previous
        return [message for turn in reversed(turns) for message in turn]


class ResponseStore:
    """At most max_count responses by id; storing one more forgets the oldest (a response that a stored one
    continued is still reachable through it, though no longer by its id)."""

    def __init__(self, max_count: int = DEFAULT_MAX_STORED_RESPONSES) -> None:
        self.max_count = max_count
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._responses.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Forgets the id; a stored response that continued it still holds its turns (as for one forgotten)."""
        return self._responses.pop(response_id, None) is not None

    def put(self, stored: StoredResponse) -> None:
        if self.max_count <= 0:
            return
        self._responses[stored.response["id"]] = stored
        while len(self._responses) > self.max_count:
            self._responses.popitem(last=False)
