"""Which KV blocks each request holds: allocation, prefix-cache hits, copy-on-write and freeing."""
from __future__ import annotations

import hashlib
from array import array

from engine.block_pool import BlockPool, KVCacheBlock
from engine.request import Request


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """Chained over every preceding token, so equal hashes mean equal whole prefixes."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.blocks_to_copy: list[tuple[int, int]] = []  # (src, dst) copy-on-write, run before this step's forward
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found in the cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests; idle cached blocks count as free."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def get_computed_blocks(self, request: Request) -> list[KVCacheBlock]:
        """The longest run of cached full blocks that starts the request's tokens. The last token is
        always recomputed: its logits are needed. A request asking for prompt logprobs reads no cache (as vLLM):
        every prompt position must run for its logits."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._update_hashes(request, max_blocks)
        blocks = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Give the request blocks for its next num_new_tokens tokens (after any computed_blocks found in
        the prefix cache). Returns False, changing nothing, when the pool is too small right now."""
        if not computed_blocks and self._has_room(request, num_new_tokens):
            return True  # the usual decode step: the tokens fit the blocks held, and the one written is private
        computed_blocks = computed_blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        num_needed = -(-num_total // self.block_size) - len(request.block_ids) - len(computed_blocks)
        write_index = num_computed // self.block_size
        copy_on_write = write_index < len(request.block_ids) and self.pool.blocks[request.block_ids[write_index]].ref_count > 1
        reclaimed = sum(1 for b in computed_blocks if b.ref_count == 0)  # idle cached blocks leave the free list
        if max(num_needed, 0) + copy_on_write > self.pool.num_free_blocks - reclaimed:
            return False
        for block in computed_blocks:
            self.pool.touch(block)
        request.block_ids.extend(b.block_id for b in computed_blocks)
        request.num_computed_tokens = num_computed
        if copy_on_write:
            self._copy_on_write(request, write_index)
        if num_needed > 0:
            request.block_ids.extend(b.block_id for b in self.pool.allocate(num_needed))
        return True

    def _has_room(self, request: Request, num_new_tokens: int) -> bool:
        block_ids, write_index = request.block_ids, request.num_computed_tokens // self.block_size
        return (request.num_computed_tokens + num_new_tokens <= len(block_ids) * self.block_size
                and self.pool.blocks[block_ids[write_index]].ref_count == 1)

    def fork(self, parent: Request, child: Request) -> None:
        """The child shares every block of the parent; the shared partial block is copied on first write."""
        for block_id in parent.block_ids:
            self.pool.blocks[block_id].ref_count += 1
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_blocks = parent.num_cached_blocks

    def free(self, request: Request) -> None:
        self.pool.free([self.pool.blocks[i] for i in request.block_ids])
        request.block_ids = []
        request.num_cached_blocks = 0

    def take_blocks_to_copy(self) -> list[tuple[int, int]]:
        copies, self.blocks_to_copy = self.blocks_to_copy, []
        return copies

    def _copy_on_write(self, request: Request, index: int) -> None:
        shared = self.pool.blocks[request.block_ids[index]]
        (private,) = self.pool.allocate(1)
        self.pool.free([shared])
        request.block_ids[index] = private.block_id
        request.num_synced_blocks = min(request.num_synced_blocks, index)
        self.blocks_to_copy.append((shared.block_id, private.block_id))

    def _update_hashes(self, request: Request, num_full_blocks: int) -> None:
        hashes, size = request.block_hashes, self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else b""
            hashes.append(hash_block(parent, request.all_token_ids[i * size:(i + 1) * size]))

    def cache_computed_blocks(self, request: Request) -> None:
        """Make the request's full, computed blocks findable by later requests. Called once a step has run,
        never at allocation: a step that fails must not leave hashes on blocks that were never written. A block
        whose last token is a placeholder (async scheduling) waits for that token: its hash needs it."""
        if not self.enable_caching:
            return
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        if num_full <= request.num_cached_blocks:
            return  # most steps: no block filled (a cached block is hashed already)
        self._update_hashes(request, num_full)
        for i in range(request.num_cached_blocks, num_full):
            self.pool.cache(self.pool.blocks[request.block_ids[i]], request.block_hashes[i])
        request.num_cached_blocks = num_full
