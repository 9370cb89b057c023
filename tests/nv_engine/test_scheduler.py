"""The Scheduler on its own, driven by a fake model runner (no model, no torch forward): exact
plans step by step, the token budget, admission limits, preemption order, prefix hits after a
recompute, and every block back in the pool at the end."""

from __future__ import annotations

import pytest
from nv_testing import tiny_qwen3_config

from nv_engine.config import Config
from nv_engine.core.output_processor import OutputProcessor
from nv_engine.core.scheduler import Scheduler
from nv_engine.core.sequence import Sequence
from nv_engine.sampling_params import SamplingParams

EOS = 2


@pytest.fixture
def model_dir(tmp_path):
    tiny_qwen3_config().save_pretrained(tmp_path)
    return tmp_path


class Engine:
    """A Scheduler, an OutputProcessor (no tokenizer) and a fake runner that samples token
    100 + (the row's position in its sequence) for every row that samples."""

    def __init__(self, model_dir, num_blocks: int, **config) -> None:
        config = Config.from_kwargs(str(model_dir), device="cpu", kvcache_block_size=4, **config)
        self.sched = Scheduler(config, num_blocks, {EOS})
        self.out = OutputProcessor(None, {EOS}, config.max_model_len, self.sched.finish)
        self.plans = []

    def add(self, prompt: list[int], max_tokens: int) -> Sequence:
        seq = Sequence(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), seed=0)
        self.sched.add(seq)
        self.out.add(seq, stream=False)
        return seq

    def step(self):
        plan = self.sched.schedule()
        self.plans.append(plan)
        sampled = [100 + s.start_pos + len(s.token_ids) for s in plan.seqs if s.sample]
        return plan, self.out.process(self.sched.postprocess(plan, sampled))

    def rows(self, plan):
        """(request, start position, number of tokens, samples) per row."""
        return [(s.seq_id, s.start_pos, len(s.token_ids), s.sample) for s in plan.seqs]


def test_chunked_prefill_then_decode(model_dir):
    e = Engine(model_dir, num_blocks=16, max_num_batched_tokens=8)
    a = e.add(list(range(10, 20)), max_tokens=3)  # 10 prompt tokens
    b = e.add(list(range(30, 33)), max_tokens=2)  # 3
    plan, done = e.step()
    assert plan.is_prefill and e.rows(plan) == [(a.seq_id, 0, 8, False)]  # the budget: 8
    plan, done = e.step()  # a's rest first, then b is admitted into what is left
    assert e.rows(plan) == [(a.seq_id, 8, 2, True), (b.seq_id, 0, 3, True)]
    plan, done = e.step()
    assert not plan.is_prefill
    # one token per running request, its last sampled token at its last position
    assert e.rows(plan) == [(a.seq_id, 10, 1, True), (b.seq_id, 3, 1, True)]
    assert [s.token_ids for s in plan.seqs] == [[110], [103]]
    assert [o.request_id for o in done] == [b.seq_id]  # b: 2 tokens, its max
    plan, done = e.step()
    assert e.rows(plan) == [(a.seq_id, 11, 1, True)]
    assert [(o.request_id, o.token_ids, o.finish_reason) for o in done] == [
        (a.seq_id, [110, 111, 112], "length")
    ]
    assert e.sched.is_finished() and e.sched.schedule() is None
    bm = e.sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_mixed_steps_take_decode_tokens_first(model_dir):
    e = Engine(model_dir, num_blocks=16, max_num_batched_tokens=8, mix_decode_and_prefill=True)
    a = e.add([1, 2, 3], max_tokens=5)
    plan, _ = e.step()
    assert e.rows(plan) == [(a.seq_id, 0, 3, True)]
    b = e.add(list(range(20, 40)), max_tokens=2)  # 20 tokens: three chunks of what is left
    plan, _ = e.step()
    assert plan.is_prefill  # a's next token, then b's first chunk in the rest of the budget
    assert e.rows(plan) == [(a.seq_id, 3, 1, True), (b.seq_id, 0, 7, False)]
    plan, _ = e.step()
    assert e.rows(plan) == [(a.seq_id, 4, 1, True), (b.seq_id, 7, 7, False)]
    plan, _ = e.step()
    assert e.rows(plan) == [(a.seq_id, 5, 1, True), (b.seq_id, 14, 6, True)]
    plan, _ = e.step()  # b's prompt is computed: a pure decode step again
    assert not plan.is_prefill and e.rows(plan) == [(a.seq_id, 6, 1, True), (b.seq_id, 20, 1, True)]


def test_admission_stops_at_max_num_seqs(model_dir):
    e = Engine(model_dir, num_blocks=32, max_num_seqs=2)
    seqs = [e.add([5, 6, 7], max_tokens=4) for _ in range(3)]
    plan, _ = e.step()
    assert [r[0] for r in e.rows(plan)] == [s.seq_id for s in seqs[:2]]
    assert list(e.sched.waiting) == [seqs[2]]


def test_plans_hold_copies_of_block_tables(model_dir):
    e = Engine(model_dir, num_blocks=16)
    e.add([1, 3, 5], max_tokens=8)
    plan, _ = e.step()  # 3 prompt tokens in block 0
    table = plan.seqs[0].block_table
    for _ in range(3):
        e.step()  # the sequence grows into a second block
    assert list(table) == [0]  # the first plan's table did not change under it
    assert list(e.plans[-1].seqs[0].block_table) == [0, 1]


def test_preemption_takes_the_latest_admitted_and_recomputes_from_the_cache(model_dir):
    # 4 blocks of 4 tokens; two 7-token prompts take 2 blocks each; the first decode token of
    # each needs a third block: no room, so the latest admitted (b) is preempted
    e = Engine(model_dir, num_blocks=4)
    a = e.add(list(range(40, 47)), max_tokens=6)
    b = e.add(list(range(60, 67)), max_tokens=6)
    plan, _ = e.step()
    assert e.rows(plan) == [(a.seq_id, 0, 7, True), (b.seq_id, 0, 7, True)]
    plan, _ = e.step()  # decode: a and b each write position 7, the last slot of block 2
    assert e.rows(plan) == [(a.seq_id, 7, 1, True), (b.seq_id, 7, 1, True)]
    plan, _ = e.step()  # a needs a third block: b is preempted, its blocks freed
    assert e.rows(plan) == [(a.seq_id, 8, 1, True)]
    assert e.sched.num_preemptions == 1 and list(e.sched.waiting) == [b]
    assert b.num_computed_tokens == 0
    while not e.sched.is_finished():
        plan, _ = e.step()
        if any(s.seq_id == b.seq_id for s in plan.seqs) and plan.is_prefill:
            recompute = next(s for s in plan.seqs if s.seq_id == b.seq_id)
            # its first full block (published before the preemption) is a prefix hit
            assert recompute.start_pos == 4 and b.num_cached_tokens == 4
    bm = e.sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_finish_frees_a_waiting_or_running_request(model_dir):
    e = Engine(model_dir, num_blocks=16, max_num_seqs=1)
    a = e.add([1, 2, 3], max_tokens=50)
    b = e.add([4, 5, 6], max_tokens=50)
    e.step()
    e.sched.finish(b, "abort")  # still waiting
    e.sched.finish(a, "abort")  # running
    assert e.sched.is_finished() and not e.sched.seqs
    bm = e.sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert (a.finish_reason, b.finish_reason) == ("abort", "abort")
