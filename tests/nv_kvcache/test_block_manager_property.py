"""Random interleavings of allocate / compute / append / free, checking the pool's invariants."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nv_kvcache import BlockManager

PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], [20, 21, 22, 23, 24, 25, 26]]


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockManager | None = None
        self.live: dict[int, int] = {}  # seq id -> tokens computed
        self.tokens: dict[int, list[int]] = {}  # the tokens an engine would own
        self.next_id = 0

    @rule(num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 3, 4]))
    @precondition(lambda self: self.bm is None)
    def init(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 3), max_size=6))
    @precondition(lambda self: self.bm is not None)
    def allocate(self, prefix: list[int], tail: list[int]) -> None:
        prompt = prefix + tail
        free_before = self.bm.num_free_blocks
        cached = self.bm.allocate(self.next_id, prompt, keep_tokens=False)
        if cached is None:
            assert self.bm.num_free_blocks == free_before
            assert self.next_id not in self.bm
        else:
            assert cached % self.bm.block_size == 0 and cached < len(prompt)
            self.live[self.next_id] = cached
            self.tokens[self.next_id] = list(prompt)
        self.next_id += 1

    @rule(data=st.data())
    @precondition(lambda self: self.bm is not None and self.live)
    def compute(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.live)))
        n = data.draw(st.integers(self.live[seq], self.bm.num_tokens(seq)))
        self.bm.mark_computed(seq, n, self.tokens[seq])
        self.live[seq] = n

    @rule(data=st.data(), token=st.integers(0, 3))
    @precondition(lambda self: self.bm is not None and self.live)
    def append(self, data: st.DataObject, token: int) -> None:
        seq = data.draw(st.sampled_from(sorted(self.live)))
        table = list(self.bm.block_table(seq))
        n = self.bm.num_tokens(seq)
        if self.bm.append_slots(seq):
            self.tokens[seq].append(token)
            assert self.bm.num_tokens(seq) == n + 1
            grew = n % self.bm.block_size == 0
            assert len(self.bm.block_table(seq)) == len(table) + grew
        else:
            assert self.bm.block_table(seq) == table and self.bm.num_tokens(seq) == n

    @rule(data=st.data())
    @precondition(lambda self: self.bm is not None and self.live)
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.live)))
        self.bm.free(seq)
        del self.live[seq], self.tokens[seq]

    @invariant()
    def pool_is_consistent(self) -> None:
        bm = self.bm
        if bm is None:
            return
        free_ids = bm.free_block_ids
        assert len(free_ids) == len(set(free_ids)) == bm.num_free_blocks
        used = bm.used_block_ids
        assert len(free_ids) + len(used) == bm.num_blocks
        assert not used & set(free_ids)
        holders = Counter(b for s in self.live for b in bm.block_table(s))
        for block in bm.blocks:
            assert block.ref_count == holders.get(block.block_id, 0)
        for h, block_id in bm.hash_to_block_id.items():
            block = bm.blocks[block_id]
            assert block.hash == h and block.token_ids is not None
            assert len(block.token_ids) == bm.block_size
        # Published blocks of live sequences hold exactly the tokens that sit at their position.
        for s in self.live:
            all_tokens = self.tokens[s]
            for i, block_id in enumerate(bm.block_table(s)):
                block = bm.blocks[block_id]
                if block.token_ids is not None:
                    bs = bm.block_size
                    assert list(block.token_ids) == all_tokens[i * bs : (i + 1) * bs]

    def teardown(self) -> None:
        if self.bm is None:
            return
        for seq in list(self.live):
            self.bm.free(seq)
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert sorted(self.bm.free_block_ids) == list(range(self.bm.num_blocks))


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPool = PoolMachine.TestCase
