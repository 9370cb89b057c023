from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from nv_kvcache.block import Block
from nv_kvcache.free_queue import FreeBlockPool
from nv_kvcache.hashing import hash_block_tokens, salt_hash


@dataclass(slots=True, frozen=True)
class CacheStats:
    """A snapshot of the pool. Query and hit counts are prompt tokens of successful allocations."""

    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


@dataclass(slots=True)
class _SeqState:
    """What the manager keeps of a sequence: its blocks and how far they are hashed, and its
    tokens only if the caller asked it to (`allocate(keep_tokens=True)`)."""

    block_ids: list[int]
    num_tokens: int  # token slots allocated
    num_hashed_blocks: int  # leading blocks whose hash is known (computed, or from the cache)
    last_hash: int  # chain hash of block num_hashed_blocks - 1 (the salt's seed when none)
    token_ids: list[int] | None = None  # kept tokens; None: the caller owns them


class BlockManager:
    """Owns the KV block pool and each sequence's block table.

    Contract:
    - A block's `ref_count` is the number of live sequences holding it. Blocks at ref count 0 sit
      in the free pool; those with a hash stay findable by prefix lookups until they are reused.
      Blocks without a hash are reused first, then cached ones, each least recently freed first.
    - A block is published in the hash map only after the caller reports (`mark_computed`) that
      its KV is written and it is full. Reusing a block removes its hash from the map only if the
      map still points at that block.
    - `allocate` and `append_tokens` are atomic: when the pool cannot satisfy them they return
      `None`/`False` and no ref count or queue position moves.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self._free = FreeBlockPool(self.blocks)
        self._seqs: dict[Hashable, _SeqState] = {}
        self._queries = 0
        self._hits = 0

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (next to be reused first)."""
        return [b.block_id for b in self._free]

    @property
    def used_block_ids(self) -> set[int]:
        return {b.block_id for b in self.blocks if b.ref_count > 0}

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> Iterable[Hashable]:
        return self._seqs.keys()

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's block ids in order (a live list: do not mutate)."""
        return self._state(seq_id).block_ids

    def num_tokens(self, seq_id: Hashable) -> int:
        """Token slots allocated to the sequence."""
        return self._state(seq_id).num_tokens

    def stats(self) -> CacheStats:
        free = len(self._free)
        return CacheStats(self.num_blocks, free, self.num_blocks - free, self._queries, self._hits)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation ----------------------------------------------------------------------------

    def allocate(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        cache_salt: int | str | bytes | None = None,
        read_cache: bool = True,
        keep_tokens: bool = True,
    ) -> int | None:
        """Give `seq_id` blocks for all of `token_ids`, reusing the longest verified cached prefix
        (none with `read_cache=False`: every token is computed, and its blocks still published).

        `keep_tokens`: the manager keeps a copy of the sequence's tokens, grown by
        `append_tokens` and read by `mark_computed` (the simple standalone use). False: the
        caller owns its tokens (no second copy): it grows the sequence with `append_slots` and
        hands its tokens to `mark_computed`.

        Returns the number of leading tokens whose KV is already cached (a multiple of
        block_size, always < len(token_ids)), or None, changing nothing, when the pool is short.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        if len(token_ids) == 0:
            raise ValueError("token_ids must not be empty")
        bs = self.block_size
        seed = salt_hash(cache_salt)
        cached: list[Block] = []
        last_hash = seed
        if self.enable_prefix_caching and read_cache:
            # The block holding the last token is never taken from the cache, so at least one
            # token is always left to compute (its logits are needed).
            for i in range((len(token_ids) - 1) // bs):
                toks = tuple(token_ids[i * bs : (i + 1) * bs])
                h = hash_block_tokens(last_hash, toks)
                block_id = self.hash_to_block_id.get(h)
                if block_id is None or self.blocks[block_id].token_ids != toks:
                    break
                cached.append(self.blocks[block_id])
                last_hash = h
        num_new = self.blocks_needed(len(token_ids)) - len(cached)
        num_revived = sum(1 for b in cached if b.ref_count == 0)
        if num_new + num_revived > len(self._free):
            return None

        for block in cached:
            if block.ref_count == 0:
                self._free.remove(block)  # revived before any eviction, so never evicted for itself
            block.ref_count += 1
        block_ids = [b.block_id for b in cached]
        block_ids.extend(self._take_free_block() for _ in range(num_new))
        kept = list(token_ids) if keep_tokens else None
        self._seqs[seq_id] = _SeqState(block_ids, len(token_ids), len(cached), last_hash, kept)
        num_cached_tokens = len(cached) * bs
        self._queries += len(token_ids)
        self._hits += num_cached_tokens
        return num_cached_tokens

    def can_append(self, seq_id: Hashable, num_tokens: int = 1) -> bool:
        state = self._state(seq_id)
        extra = self.blocks_needed(state.num_tokens + num_tokens) - len(state.block_ids)
        return extra <= len(self._free)

    def append_tokens(self, seq_id: Hashable, token_ids: Sequence[int]) -> bool:
        """`append_slots` for a sequence whose tokens the manager keeps, and the tokens kept."""
        state = self._state(seq_id)
        if state.token_ids is None:
            raise ValueError(
                f"sequence {seq_id!r}: its tokens are the caller's (keep_tokens=False): use "
                "append_slots"
            )
        if not self._append(state, len(token_ids)):
            return False
        state.token_ids.extend(token_ids)
        return True

    def set_token(self, seq_id: Hashable, index: int, token_id: int) -> None:
        """Fill in kept token `index`, appended earlier as a placeholder (an engine that
        schedules a step before the previous step's token is sampled). Only tokens of blocks not
        yet hashed may change."""
        state = self._state(seq_id)
        if state.token_ids is None:
            raise ValueError(f"sequence {seq_id!r}: its tokens are the caller's: set them there")
        if not state.num_hashed_blocks * self.block_size <= index < state.num_tokens:
            raise ValueError(
                f"index={index}: only tokens in [{state.num_hashed_blocks * self.block_size}, "
                f"{state.num_tokens}) (not yet hashed) can be set"
            )
        state.token_ids[index] = token_id

    def append_slots(self, seq_id: Hashable, num_tokens: int = 1) -> bool:
        """Room for `num_tokens` more tokens (e.g. one decoded token) of a sequence whose tokens
        the caller owns, taking a new block exactly when the last one is full. Returns False,
        changing nothing, when the pool is short."""
        state = self._state(seq_id)
        if state.token_ids is not None:
            raise ValueError(
                f"sequence {seq_id!r}: the manager keeps its tokens: use append_tokens"
            )
        return self._append(state, num_tokens)

    def _append(self, state: _SeqState, num_tokens: int) -> bool:
        n = state.num_tokens
        if num_tokens == 1 and n % self.block_size:  # decode fast path: room in last block
            state.num_tokens = n + 1
            return True
        extra = self.blocks_needed(n + num_tokens) - len(state.block_ids)
        if extra > 0:
            if extra > len(self._free):
                return False
            for _ in range(extra):
                state.block_ids.append(self._take_free_block())
        state.num_tokens = n + num_tokens
        return True

    def mark_computed(
        self,
        seq_id: Hashable,
        num_computed_tokens: int,
        token_ids: Sequence[int] | None = None,
    ) -> None:
        """Report that the KV of the first `num_computed_tokens` tokens is written; every full
        block among them is hashed and published for prefix reuse. The tokens hashed are
        `token_ids` (the caller's, read up to num_computed_tokens), or the kept ones."""
        state = self._state(seq_id)
        if token_ids is None:
            if state.token_ids is None:
                raise TypeError(f"sequence {seq_id!r}: its tokens are the caller's: pass token_ids")
            token_ids = state.token_ids
        bs = self.block_size
        if num_computed_tokens // bs <= state.num_hashed_blocks and (
            0 <= num_computed_tokens <= state.num_tokens
        ):
            return  # no newly completed block (the decode-step common case)
        if not 0 <= num_computed_tokens <= min(state.num_tokens, len(token_ids)):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} outside "
                f"[0, {min(state.num_tokens, len(token_ids))}]"
            )
        if not self.enable_prefix_caching:
            return
        tokens = token_ids
        for i in range(state.num_hashed_blocks, num_computed_tokens // bs):
            toks = tuple(tokens[i * bs : (i + 1) * bs])
            h = hash_block_tokens(state.last_hash, toks)
            block = self.blocks[state.block_ids[i]]
            block.hash = h
            block.token_ids = toks
            # First writer wins: a block already published under h keeps serving hits.
            self.hash_to_block_id.setdefault(h, block.block_id)
            state.last_hash = h
            state.num_hashed_blocks = i + 1

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence's blocks, last block first, so that prefix blocks (shared by the
        most requests) are the last to be evicted."""
        state = self._seqs.pop(seq_id, None)
        if state is None:
            raise KeyError(f"unknown sequence id {seq_id!r}")
        for block_id in reversed(state.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free.append(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refuses (returns False) while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        self.hash_to_block_id.clear()
        self._free.forget_hashes()
        return True

    # ---- internals -----------------------------------------------------------------------------

    def _state(self, seq_id: Hashable) -> _SeqState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id!r}") from None

    def _take_free_block(self) -> int:
        block = self._free.popleft()
        if block.hash is not None:
            if self.hash_to_block_id.get(block.hash) == block.block_id:
                del self.hash_to_block_id[block.hash]
            block.hash = None
            block.token_ids = None
        block.ref_count = 1
        return block.block_id
