from __future__ import annotations

from collections.abc import Iterator

from nv_kvcache.block import Block


class FreeBlockQueue:
    """Doubly linked LRU queue of free blocks; every operation is O(1).

    The head is the least recently freed block (taken first for new allocations); the tail is the
    most recently freed. A cached block revived by a prefix hit is unlinked from the middle.
    """

    def __init__(self, blocks: list[Block]) -> None:
        self._head = Block(-1)  # sentinels: never handed out
        self._tail = Block(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Block]:
        node = self._head.next
        while node is not self._tail:
            yield node
            node = node.next

    def __contains__(self, block: Block) -> bool:
        return block.prev is not None

    def append(self, block: Block) -> None:
        """Put `block` at the most-recently-freed end."""
        last = self._tail.prev
        last.next = block
        block.prev = last
        block.next = self._tail
        self._tail.prev = block
        self._len += 1

    def popleft(self) -> Block:
        """Take the least recently freed block."""
        block = self._head.next
        if block is self._tail:
            raise IndexError("pop from an empty FreeBlockQueue")
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        """Unlink `block` from wherever it sits in the queue."""
        block.prev.next = block.next
        block.next.prev = block.prev
        block.prev = block.next = None
        self._len -= 1


class FreeBlockPool:
    """The free blocks as two LRU queues (newer vLLM's order): blocks without a hash are reused
    first, least recently freed first; cached blocks (with a hash) only when none is left, least
    recently freed first. So fewer cached prefixes are evicted. Every operation is O(1).
    A block's queue is decided by its `hash` when it enters, so a block must leave the pool
    before its hash changes (`forget_hashes` handles the pool-wide reset)."""

    def __init__(self, blocks: list[Block]) -> None:
        self._uncached = FreeBlockQueue([b for b in blocks if b.hash is None])
        self._cached = FreeBlockQueue([b for b in blocks if b.hash is not None])

    def __len__(self) -> int:
        return len(self._uncached) + len(self._cached)

    def __iter__(self) -> Iterator[Block]:
        """In eviction order: the next block to be reused first."""
        yield from self._uncached
        yield from self._cached

    def append(self, block: Block) -> None:
        (self._uncached if block.hash is None else self._cached).append(block)

    def remove(self, block: Block) -> None:
        (self._uncached if block.hash is None else self._cached).remove(block)

    def popleft(self) -> Block:
        return (self._uncached if len(self._uncached) else self._cached).popleft()

    def forget_hashes(self) -> None:
        """Drop every free block's hash, keeping the blocks in the order they were freed."""
        while len(self._cached):
            block = self._cached.popleft()
            block.hash = block.token_ids = None
            self._uncached.append(block)
