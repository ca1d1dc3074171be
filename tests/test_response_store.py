"""The in-memory store of responses: bounded by count, oldest forgotten first, conversations shared by turns."""
from __future__ import annotations

from server.response_store import ResponseStore, StoredResponse


def turn(response_id: str, text: str, previous: StoredResponse | None = None) -> StoredResponse:
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text.upper()}]
    return StoredResponse({"id": response_id}, messages, previous)


def test_storing_past_the_bound_forgets_the_oldest_first():
    store = ResponseStore(max_count=2)
    for response_id in ("a", "b", "c"):
        store.put(turn(response_id, response_id))
    assert len(store) == 2 and store.get("a") is None
    assert [store.get(i).response["id"] for i in ("b", "c")] == ["b", "c"]


def test_a_bound_of_zero_stores_nothing():
    store = ResponseStore(max_count=0)
    store.put(turn("a", "a"))
    assert len(store) == 0 and store.get("a") is None


def test_a_continued_conversation_outlives_the_ids_of_its_earlier_turns():
    store = ResponseStore(max_count=1)
    first = turn("a", "hi")
    store.put(first)
    store.put(turn("b", "again", previous=first))
    assert store.get("a") is None
    assert [m["content"] for m in store.get("b").conversation] == ["hi", "HI", "again", "AGAIN"]
