from __future__ import annotations


class Block:
    """One physical KV-cache block.

    `ref_count` is the number of live sequences whose block table holds this block. `hash` and
    `token_ids` are set once the block's KV is computed and it is full; they survive the block being
    freed (so a later prompt can revive it) and are dropped only when the block is reused.
    `prev`/`next` link the block into the free queue while its ref count is zero.
    """

    __slots__ = ("block_id", "hash", "next", "prev", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.prev: Block | None = None
        self.next: Block | None = None

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref={self.ref_count}, hash={self.hash})"
