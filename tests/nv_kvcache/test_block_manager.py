from __future__ import annotations

import pytest

from nv_kvcache import BlockManager, FreeBlockQueue, hash_block_tokens
from nv_kvcache.block import Block


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


class Tracked:
    """A BlockManager beside the token lists an engine owns (the manager keeps none): appends
    extend them, and mark_computed hands them over."""

    def __init__(self, *args, **kwargs) -> None:
        self.bm = BlockManager(*args, **kwargs)
        self.tokens: dict[str, list[int]] = {}

    def __getattr__(self, name: str):
        return getattr(self.bm, name)

    def __contains__(self, seq) -> bool:
        return seq in self.bm

    def allocate(self, seq, token_ids, *args, **kwargs):
        cached = self.bm.allocate(seq, token_ids, *args, keep_tokens=False, **kwargs)
        if cached is not None:
            self.tokens[seq] = list(token_ids)
        return cached

    def append_tokens(self, seq, token_ids) -> bool:
        ok = self.bm.append_slots(seq, len(token_ids))
        if ok:
            self.tokens[seq] += token_ids
        return ok

    def mark_computed(self, seq, num_computed_tokens: int) -> None:
        self.bm.mark_computed(seq, num_computed_tokens, self.tokens.get(seq, []))


def test_block_size_and_pool_validation():
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)


def test_allocate_fresh_takes_blocks_in_order():
    bm = Tracked(8, 4)
    assert bm.allocate("a", toks(0, 10)) == 0
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert bm.free_block_ids == [3, 4, 5, 6, 7]
    assert [b.ref_count for b in bm.blocks[:4]] == [1, 1, 1, 0]


def test_block_size_one():
    bm = Tracked(8, 1)
    assert bm.allocate("a", [5, 6, 7]) == 0
    bm.mark_computed("a", 3)
    assert bm.allocate("b", [5, 6, 9]) == 2
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]


def test_prefix_hit_requires_computed_blocks():
    bm = Tracked(16, 4)
    prompt = toks(100, 12)
    bm.allocate("a", prompt)
    # Not computed yet: nothing is published, so no hit.
    assert bm.allocate("b", prompt + [1]) == 0
    bm.free("b")
    bm.mark_computed("a", 5)  # one full block computed
    assert bm.allocate("c", prompt + [1]) == 4
    assert bm.block_table("c")[0] == bm.block_table("a")[0]
    assert bm.blocks[bm.block_table("a")[0]].ref_count == 2
    bm.mark_computed("a", 12)
    assert bm.allocate("d", prompt + [1]) == 12
    assert bm.block_table("d")[:3] == bm.block_table("a")


def test_read_cache_false_takes_fresh_blocks_and_still_publishes():
    bm = Tracked(16, 4)
    prompt = toks(100, 12)
    bm.allocate("a", prompt)
    bm.mark_computed("a", 12)
    assert bm.allocate("b", prompt + [1], read_cache=False) == 0
    assert bm.block_table("b") == [3, 4, 5, 6]  # none shared with a's [0, 1, 2]
    assert all(bm.blocks[i].ref_count == 1 for i in range(7))
    bm.mark_computed("b", 13)  # same hashes as a's blocks: the map keeps a's entries
    assert bm.allocate("c", prompt + [2]) == 12
    assert bm.block_table("c")[:3] == [0, 1, 2]


def test_last_prompt_token_block_never_cached():
    bm = Tracked(16, 4)
    prompt = toks(0, 8)  # exactly 2 blocks
    bm.allocate("a", prompt)
    bm.mark_computed("a", 8)
    assert bm.allocate("b", prompt) == 4  # at most k-1 = 1 block reused
    assert bm.block_table("b")[0] == bm.block_table("a")[0]
    assert bm.block_table("b")[1] != bm.block_table("a")[1]


def test_hash_collision_is_a_miss():
    bm = Tracked(8, 4)
    bm.allocate("a", toks(0, 5))
    bm.mark_computed("a", 5)
    # Forge a collision: point the hash of block [9,9,9,9] at block 0, which holds [0,1,2,3].
    bm.hash_to_block_id[hash_block_tokens(0, [9, 9, 9, 9])] = 0
    assert bm.allocate("b", [9, 9, 9, 9, 1]) == 0
    assert bm.block_table("b")[0] != 0


def test_salt_changes_every_hash():
    bm = Tracked(16, 4)
    prompt = toks(0, 9)
    bm.allocate("a", prompt, cache_salt="alice")
    bm.mark_computed("a", 9)
    assert bm.allocate("b", prompt, cache_salt="bob") == 0
    assert bm.allocate("c", prompt) == 0
    assert bm.allocate("d", prompt, cache_salt="alice") == 8


def test_allocation_is_atomic_when_pool_is_short():
    bm = Tracked(4, 4)
    bm.allocate("a", toks(0, 9))  # 3 blocks
    bm.mark_computed("a", 9)
    before = ([b.ref_count for b in bm.blocks], bm.free_block_ids, dict(bm.hash_to_block_id))
    # Shares 2 cached blocks but needs 2 new ones; only 1 is free.
    assert bm.allocate("b", toks(0, 8) + toks(50, 5)) is None
    assert "b" not in bm
    assert (
        [b.ref_count for b in bm.blocks],
        bm.free_block_ids,
        dict(bm.hash_to_block_id),
    ) == before
    assert bm.stats().prefix_cache_queries == 9


def test_lru_reuse_and_revival():
    bm = Tracked(6, 4)
    bm.allocate("a", toks(0, 12))  # blocks 0,1,2
    bm.mark_computed("a", 12)
    bm.allocate("b", toks(100, 8))  # blocks 3,4
    bm.mark_computed("b", 8)
    bm.free("a")  # released in reverse: 2,1,0 appended after the never-used 5
    assert bm.free_block_ids == [5, 2, 1, 0]
    bm.free("b")
    assert bm.free_block_ids == [5, 2, 1, 0, 4, 3]
    # Reviving a's prefix [0,1] takes them out of the queue; the new block is the LRU head (5).
    assert bm.allocate("c", toks(0, 8) + [7]) == 8
    assert bm.block_table("c") == [0, 1, 5]
    assert bm.free_block_ids == [2, 4, 3]
    # The next fresh block evicts 2 (a's third block) and drops its hash.
    h2 = bm.blocks[2].hash
    assert bm.hash_to_block_id[h2] == 2
    bm.allocate("d", [42])
    assert bm.block_table("d") == [2]
    assert h2 not in bm.hash_to_block_id
    assert bm.blocks[2].hash is None


def test_reviving_block_is_never_evicted_for_same_request():
    bm = Tracked(3, 2)
    bm.allocate("a", [1, 2, 3, 4, 5])  # blocks 0,1,2
    bm.mark_computed("a", 5)
    bm.free("a")
    assert bm.free_block_ids == [2, 1, 0]
    # Needs cached blocks 0,1 (both free) plus two new ones: only one other block exists.
    assert bm.allocate("b", [1, 2, 3, 4, 9, 9, 9]) is None
    assert bm.free_block_ids == [2, 1, 0]
    assert bm.allocate("b", [1, 2, 3, 4, 9]) == 4
    assert bm.block_table("b") == [0, 1, 2]


def test_reuse_keeps_hash_map_entry_of_other_block():
    bm = Tracked(4, 2)
    # Two sequences compute the same block; the first publishes it, the second's copy is unmapped.
    bm.allocate("a", [1, 2, 3])
    bm.allocate("b", [1, 2, 4])
    bm.mark_computed("a", 2)
    bm.mark_computed("b", 2)
    h = bm.blocks[0].hash
    assert bm.blocks[2].hash == h and bm.hash_to_block_id[h] == 0
    bm.free("b")  # free order: 3, 2
    bm.allocate("c", [7])  # takes 3
    bm.allocate("d", [8])  # takes 2, whose hash the map does not point at
    assert bm.block_table("d") == [2]
    assert bm.hash_to_block_id[h] == 0


def test_append_takes_block_exactly_when_full():
    bm = Tracked(3, 4)
    bm.allocate("a", toks(0, 3))
    assert bm.append_tokens("a", [3])
    assert bm.block_table("a") == [0]
    assert bm.append_tokens("a", [4])
    assert bm.block_table("a") == [0, 1]
    assert bm.num_tokens("a") == 5


def test_append_without_room_changes_nothing():
    bm = Tracked(2, 2)
    bm.allocate("a", [1, 2])
    bm.allocate("b", [3, 4])
    assert not bm.can_append("a")
    assert bm.append_tokens("a", [9]) is False
    assert bm.block_table("a") == [0] and bm.num_tokens("a") == 2
    bm.free("b")
    assert bm.append_tokens("a", [9])
    assert bm.block_table("a") == [0, 1]


def test_decode_blocks_get_hashed_after_compute():
    bm = Tracked(8, 2)
    bm.allocate("a", [1, 2, 3])
    bm.mark_computed("a", 3)
    bm.append_tokens("a", [4])
    bm.mark_computed("a", 4)
    bm.append_tokens("a", [5])
    assert bm.allocate("b", [1, 2, 3, 4, 6]) == 4


def test_hashes_come_from_the_callers_tokens_at_mark_computed():
    # An overlapped engine appends the slot of a token not yet sampled and fills it in later,
    # in its own token list (the manager keeps none to sync): the hash covers the real token.
    bm = Tracked(8, 2)
    bm.allocate("a", [1, 2, 3])
    bm.mark_computed("a", 3)
    bm.append_tokens("a", [-1])  # a placeholder
    bm.tokens["a"][3] = 4  # sampled
    bm.mark_computed("a", 4)
    assert bm.allocate("b", [1, 2, 3, 4, 6]) == 4
    with pytest.raises(ValueError, match="num_computed_tokens=5"):
        bm.bm.mark_computed("a", 5, [1, 2, 3, 4])  # past the tokens given
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.bm.mark_computed("zz", 0, [])


def test_the_manager_can_keep_the_tokens_itself():
    # keep_tokens=True (the default): the standalone API of earlier versions, the manager's
    # own copy grown by append_tokens and filled in by set_token
    bm = BlockManager(8, 2)
    bm.allocate("a", [1, 2, 3])
    bm.mark_computed("a", 3)
    assert bm.append_tokens("a", [-1])  # a placeholder
    bm.set_token("a", 3, 4)
    bm.mark_computed("a", 4)
    assert bm.allocate("b", [1, 2, 3, 4, 6]) == 4
    with pytest.raises(ValueError, match="not yet hashed"):
        bm.set_token("a", 1, 9)  # block 0 is hashed
    with pytest.raises(ValueError, match="append_tokens"):
        bm.append_slots("a")  # the kept copy would fall behind
    c = BlockManager(8, 2)
    c.allocate("x", [1, 2, 3], keep_tokens=False)
    with pytest.raises(ValueError, match="append_slots"):
        c.append_tokens("x", [4])
    with pytest.raises(TypeError, match="pass token_ids"):
        c.mark_computed("x", 2)


def test_stats_and_hit_rate():
    bm = Tracked(8, 4)
    bm.allocate("a", toks(0, 8))
    bm.mark_computed("a", 8)
    bm.allocate("b", toks(0, 8))
    s = bm.stats()
    assert (s.num_free_blocks, s.num_used_blocks) == (5, 3)
    assert s.usage == pytest.approx(3 / 8)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (16, 4)
    assert s.hit_rate == pytest.approx(0.25)


def test_reset_prefix_cache_refuses_while_in_use():
    bm = Tracked(4, 2)
    bm.allocate("a", [1, 2, 3])
    bm.mark_computed("a", 3)
    assert bm.reset_prefix_cache() is False
    assert bm.hash_to_block_id
    bm.free("a")
    assert bm.reset_prefix_cache() is True
    assert not bm.hash_to_block_id
    assert all(b.hash is None for b in bm.blocks)
    assert bm.allocate("b", [1, 2, 3]) == 0


def test_prefix_caching_off():
    bm = Tracked(8, 2, enable_prefix_caching=False)
    bm.allocate("a", [1, 2, 3])
    bm.mark_computed("a", 3)
    assert bm.allocate("b", [1, 2, 3]) == 0
    assert not bm.hash_to_block_id


def test_misuse_raises_clear_errors():
    bm = Tracked(4, 2)
    bm.allocate("a", [1])
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate("a", [1])
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.free("zzz")
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.append_tokens("zzz", [1])
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.mark_computed("zzz", 0)
    with pytest.raises(ValueError, match="empty"):
        bm.allocate("b", [])
    with pytest.raises(ValueError, match="num_computed_tokens"):
        bm.mark_computed("a", 5)
    with pytest.raises(TypeError, match="cache_salt"):
        bm.allocate("c", [1], cache_salt=1.5)


def test_free_queue_is_o1_linked_list():
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4]
    assert q.popleft().block_id == 0
    q.append(blocks[0])
    assert [b.block_id for b in q] == [1, 3, 4, 0]
    assert len(q) == 4 and blocks[2] not in q and blocks[3] in q
    for _ in range(4):
        q.popleft()
    with pytest.raises(IndexError):
        q.popleft()


def test_blocks_without_a_hash_are_reused_before_cached_ones():
    bm = Tracked(6, 4)
    bm.allocate("cached", toks(0, 8))  # blocks 0, 1
    bm.mark_computed("cached", 8)  # both hashed
    bm.allocate("scratch", toks(100, 6))  # blocks 2, 3: block 3 half full, never hashed
    bm.mark_computed("scratch", 4)  # block 2 hashed
    bm.free("cached")  # freed first: 1 then 0 (last block first)
    bm.free("scratch")  # then 3, 2
    # eviction order: the unhashed block 3, then the free blocks that never held anything
    # (4, 5 were never used, so they are in the unhashed queue from the start), then the
    # cached blocks, least recently freed first
    assert bm.free_block_ids == [4, 5, 3, 1, 0, 2]
    assert bm.allocate("new", toks(500, 12)) == 0
    assert bm.block_table("new") == [4, 5, 3]
    # the cached prefix survived: it still hits
    assert bm.allocate("again", toks(0, 9)) == 8
    assert bm.block_table("again")[:2] == [0, 1]


def test_reset_prefix_cache_moves_blocks_to_the_uncached_queue_in_order():
    bm = Tracked(4, 2)
    bm.allocate("a", toks(0, 4))
    bm.mark_computed("a", 4)
    bm.free("a")
    assert bm.free_block_ids == [2, 3, 1, 0]
    assert bm.reset_prefix_cache()
    assert bm.free_block_ids == [2, 3, 1, 0]
    assert all(b.hash is None for b in bm.blocks) and not bm.hash_to_block_id
    assert bm.allocate("b", toks(0, 3)) == 0  # nothing cached any more


def test_block_hashes_are_128_bit_xxh3_chains():
    from array import array

    import xxhash

    h0 = hash_block_tokens(0, [1, 2, 3])
    assert h0 == xxhash.xxh3_128_intdigest(bytes(16) + array("q", [1, 2, 3]).tobytes())
    h1 = hash_block_tokens(h0, [4, 5, 6])
    assert h1 == xxhash.xxh3_128_intdigest(
        h0.to_bytes(16, "little") + array("q", [4, 5, 6]).tobytes()
    )
    # 128 bits in use: a 64-bit chain would make a birthday search for colliding prefixes
    # (~2^32 tries) practical
    hashes = [hash_block_tokens(0, [i]) for i in range(64)]
    assert max(hashes) >= 1 << 64 and len(set(hashes)) == 64
