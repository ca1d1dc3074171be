"""The pool of KV-cache blocks: reference counts, prefix-cache hashes and an O(1) LRU free list."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and cached; cleared on eviction
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently freed first; links live on the blocks so removal
    from the middle (a cached block reused by a prefix hit) is O(1)."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.head = KVCacheBlock(-1)
        self.tail = KVCacheBlock(-1)
        self.head.next_free, self.tail.prev_free = self.tail, self.head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVCacheBlock) -> None:
        last = self.tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self.tail.prev_free = self.tail, block
        self.num_free_blocks += 1

    def remove(self, block: KVCacheBlock) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def popleft(self) -> KVCacheBlock:
        assert self.num_free_blocks > 0, "no free block"
        block = self.head.next_free
        self.remove(block)
        return block


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[bytes, KVCacheBlock] = {}
        self.enable_caching = enable_caching

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, counting cached ones nobody holds: they are evicted on demand."""
        return self.free_queue.num_free_blocks

    def allocate(self, count: int) -> list[KVCacheBlock]:
        assert count <= self.num_free_blocks, f"asked for {count} blocks, {self.num_free_blocks} free"
        blocks = []
        for _ in range(count):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_count = 1
            blocks.append(block)
        return blocks

    def lookup(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def touch(self, block: KVCacheBlock) -> None:
        """Take a reference to a block found in the prefix cache, pulling it off the free list if idle."""
        if block.ref_count == 0:
            self.free_queue.remove(block)
        block.ref_count += 1

    def cache(self, block: KVCacheBlock, block_hash: bytes) -> None:
        """A block just became full: make it findable by its prefix hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached_blocks:
            return
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block

    def free(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference from each; blocks reaching zero join the LRU tail, the last block of a
        sequence first evicted (freed in reverse order, as vLLM, so a shared prefix outlives its tails)."""
        for block in reversed(blocks):
            assert block.ref_count > 0, f"block {block.block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue.append(block)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None

    def check_integrity(self) -> None:
        """Every block is either held (ref_count > 0) or on the free list, never both."""
        held = sum(1 for b in self.blocks if b.ref_count > 0)
        assert held + self.num_free_blocks == self.num_blocks, (
            f"{held} held + {self.num_free_blocks} free != {self.num_blocks} blocks")
