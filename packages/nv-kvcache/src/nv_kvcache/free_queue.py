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
