"""Block pool and KV cache manager: reference counts, LRU eviction, prefix hits, copy-on-write."""
from __future__ import annotations

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, request_id, 0, tokens, SamplingParams(), 16)


def compute(kv: KVCacheManager, request: Request, num_tokens: int) -> bool:
    """Allocate for a step and run it: only then do its full blocks enter the prefix cache."""
    if not kv.allocate_slots(request, num_tokens):
        return False
    request.num_computed_tokens += num_tokens
    kv.cache_computed_blocks(request)
    return True


def test_freed_blocks_stay_cached_until_evicted_least_recent_first():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_caching=True)
    a = make_request("a", list(range(9)))  # two full blocks and one partial
    assert compute(kv, a, 9)
    full_blocks = a.block_ids[:2]
    kv.free(a)
    kv.pool.check_integrity()
    assert kv.usage == 0
    again = make_request("again", list(range(9)))
    hit = kv.get_computed_blocks(again)
    assert [b.block_id for b in hit] == full_blocks
    # Fill the pool with other tokens: the cached blocks go last (LRU), then get evicted.
    b = make_request("b", list(range(100, 116)))
    assert compute(kv, b, 16)
    assert len(kv.get_computed_blocks(make_request("c", list(range(9))))) == 2
    d = make_request("d", list(range(200, 208)))
    assert compute(kv, d, 8)
    assert kv.get_computed_blocks(make_request("e", list(range(9)))) == []
    kv.pool.check_integrity()


def test_prefix_hit_never_covers_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_request("a", list(range(8)))
    assert compute(kv, a, 8)
    same = make_request("same", list(range(8)))
    assert len(kv.get_computed_blocks(same)) == 1  # the second block holds the last token: recomputed


def test_blocks_of_a_step_that_never_ran_are_not_cached():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_request("a", list(range(9)))
    assert kv.allocate_slots(a, 9)  # the step then fails: the request is freed without computing
    kv.free(a)
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == []


def test_allocation_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_caching=True)
    a = make_request("a", list(range(12)))
    assert not kv.allocate_slots(a, 12)
    assert a.block_ids == [] and kv.pool.num_free_blocks == 2


def test_fork_shares_blocks_and_copies_the_partial_one_on_write():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    parent = make_request("p", list(range(6)))
    assert kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = make_request("c", list(range(6)))
    kv.fork(parent, child)
    assert child.block_ids == parent.block_ids and kv.pool.num_free_blocks == 6
    child.append_token(99)
    assert kv.allocate_slots(child, 1)
    assert child.block_ids[0] == parent.block_ids[0] and child.block_ids[1] != parent.block_ids[1]
    assert kv.take_blocks_to_copy() == [(parent.block_ids[1], child.block_ids[1])]
    parent.append_token(42)
    assert kv.allocate_slots(parent, 1)  # now the sole owner of its partial block: written in place
    assert kv.take_blocks_to_copy() == []
    kv.free(parent)
    kv.free(child)
    kv.pool.check_integrity()
    assert kv.usage == 0
