"""The tensor-parallel channel and worker lifecycle."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
from nv_testing import save_tiny_qwen3

from nv_engine import LLM, SamplingParams
from nv_engine.workers import StepChannel, StepReceiver, WorkerError


def _reader(name, ready, acked, parent_pid, q):
    r = StepReceiver(name, ready, acked, parent_pid)
    got = []
    while (msg := r.recv()) != "stop":
        got.append(msg)
    q.put(got)


def test_channel_grows_for_large_messages():
    ctx = mp.get_context("spawn")
    ch = StepChannel(2, ctx, size=256)
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_reader, args=(ch.shm.name, ch.ready[i], ch.acked[i], os.getpid(), q))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    msgs = [{"i": i, "data": list(range(10 ** (i % 4)))} for i in range(12)]
    try:
        for m in msgs:
            ch.send(m, alive=lambda: None)
        ch.send("stop", alive=lambda: None)
        results = [q.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
        ch.close()
    assert results == [msgs, msgs]
    assert ch.shm.size > 256


@pytest.mark.slow
def test_workers_exit_on_close_and_dead_worker_is_reported(tmp_path):
    save_tiny_qwen3(tmp_path, seed=1)
    llm = LLM(
        str(tmp_path),
        device="cpu",
        tensor_parallel_size=2,
        kvcache_block_size=4,
        distributed_timeout_s=20,
    )
    procs = list(llm._workers.procs)
    assert all(p.is_alive() for p in procs)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 3
    procs[0].kill()
    procs[0].join(5)
    with pytest.raises(WorkerError, match="rank 1"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # the failed request released its blocks
    llm.close()
    assert not any(p.is_alive() for p in procs)


@pytest.mark.slow
def test_close_leaves_no_orphans(tmp_path):
    save_tiny_qwen3(tmp_path, seed=1)
    with LLM(str(tmp_path), device="cpu", tensor_parallel_size=2) as llm:
        procs = list(llm._workers.procs)
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    t = time.monotonic()
    while any(p.is_alive() for p in procs) and time.monotonic() - t < 10:
        time.sleep(0.1)
    assert not any(p.is_alive() for p in procs)
