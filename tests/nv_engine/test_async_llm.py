"""AsyncLLM on CPU: streams equal LLM.generate, requests from many coroutines batch, leaving a
stream frees its blocks, and a failed step or a dead core kills every stream with
EngineDeadError."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from nv_engine import LLM, AsyncLLM, EngineDeadError, RequestOutput, SamplingParams
from nv_engine.engine.engine_core import _Core
from nv_engine.engine.llm_engine import LLMEngine

PROMPTS = ["Hello", "The quick brown fox", "1, 2, 3,", "Once upon a time"]
ENGINE = dict(device="cpu", kvcache_block_size=16, num_kvcache_blocks=128)


@pytest.fixture(scope="module")
def model_dir(demo_model_dir):
    return demo_model_dir


@pytest.fixture(scope="module")
def reference(model_dir):
    with LLM(str(model_dir), **ENGINE) as llm:
        greedy = SamplingParams(temperature=0, max_tokens=12)
        return llm.generate(PROMPTS, greedy, use_tqdm=False)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = AsyncLLM(str(model_dir), **ENGINE)
    yield engine
    engine.shutdown()


def _all_free(engine: AsyncLLM) -> bool:
    s = engine.stats  # the core's, as of its latest message
    return not s.num_running and not s.num_waiting and s.num_free_blocks == s.num_blocks


async def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _run(engine: AsyncLLM, prompt, params, request_id=None) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params, request_id)]


def test_concurrent_streams_equal_llm_generate(engine, reference):
    greedy = SamplingParams(temperature=0, max_tokens=12)

    async def main():
        return await asyncio.gather(*(_run(engine, p, greedy) for p in PROMPTS * 4))

    runs = asyncio.run(main())
    for outs, ref in zip(runs, reference * 4, strict=True):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert 1 <= len(outs) <= len(ref["token_ids"])  # per step (merged if the reader lags)
        assert "".join(o.delta_text for o in outs) == outs[-1].text == ref["text"]
        assert [t for o in outs for t in o.delta_token_ids] == ref["token_ids"]
        assert outs[-1].finish_reason == ref["finish_reason"]
    assert _all_free(engine)


def test_n_completions_and_logprobs(engine):
    params = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=6, logprobs=2, ignore_eos=True)

    async def main():
        return await _run(engine, "Hi", params)

    outs = asyncio.run(main())
    final: dict[int, object] = {}
    for o in outs:
        for c in o.outputs:
            final[c.index] = c
            assert len(c.delta_logprobs) == len(c.delta_token_ids)
    assert sorted(final) == [0, 1, 2] and outs[-1].finished
    assert all(len(c.token_ids) == 6 and len(c.logprobs) == 6 for c in final.values())
    assert len({tuple(c.token_ids) for c in final.values()}) > 1  # seeds seed, seed+1, ...


def test_leaving_a_stream_aborts_its_request(engine):
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main():
        stream = engine.generate("Hello", params)
        first = await anext(stream)
        assert not first.finished
        await stream.aclose()  # what a client that went away does
        await _wait_until(lambda: _all_free(engine))

        async def consume():
            async for _ in engine.generate("Hello", params):
                pass

        task = asyncio.create_task(consume())
        await _wait_until(lambda: engine.stats.num_running)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _wait_until(lambda: _all_free(engine))

    asyncio.run(main())


def test_abort_ends_the_stream(engine):
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main():
        outs = []
        async for out in engine.generate("Hello", params, request_id="r1"):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("r1")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert outs[-1].request_id == "r1" and len(outs[-1].token_ids) < 500
    assert _all_free(engine)


def test_bad_input_names_the_field(engine):
    async def main():
        with pytest.raises(ValueError, match="outside"):
            await _run(engine, [1, 10**6], SamplingParams())
        with pytest.raises(TypeError, match="sampling_params"):
            await _run(engine, "x", {"temperature": 0})
        with pytest.raises(ValueError, match="max_logprobs"):
            await _run(engine, "x", SamplingParams(logprobs=10**3))

    asyncio.run(main())
    assert _all_free(engine), engine.stats
    assert engine.is_healthy(), engine.dead_error


def test_a_dead_core_kills_every_stream(model_dir):
    engine = AsyncLLM(str(model_dir), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)

    async def main():
        s = engine.stats  # from the start, before any request (the core's ready message)
        assert s.num_blocks > 0 and s.num_free_blocks == s.num_blocks and not s.num_running
        await engine.check_health()  # healthy: returns
        assert engine.is_running and not engine.errored
        assert await engine.get_tokenizer() is engine.tokenizer is not None
        tasks = [asyncio.create_task(_run(engine, p, params)) for p in PROMPTS]
        await _wait_until(lambda: engine.stats.num_running == len(PROMPTS))
        os.kill(engine._proc.pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "engine core process exited" in str(results[0])
        assert not engine.is_healthy() and engine.errored and not engine.is_running
        with pytest.raises(EngineDeadError, match="exited"):  # vLLM's health check
            await engine.check_health()
        with pytest.raises(EngineDeadError, match="exited"):  # refused, not left waiting
            await asyncio.wait_for(_run(engine, "Hello", params), 60)  # (a guard on a hang)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def _spawned_children(pid: int) -> list[int]:
    """Processes that `pid` spawned with multiprocessing (not its resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_a_dead_tensor_parallel_worker_kills_every_stream(model_dir):
    # the serving path with TP=2: a worker killed mid-stream ends every stream with an error
    # naming its rank, /health's is_healthy() turns False, and nothing hangs
    engine = AsyncLLM(str(model_dir), **ENGINE, tensor_parallel_size=2)
    params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)

    async def main():
        s = engine.stats  # from the start, before any request (the core's ready message)
        assert s.num_blocks > 0 and s.num_free_blocks == s.num_blocks and not s.num_running
        await engine.check_health()  # healthy: returns
        assert engine.is_running and not engine.errored
        assert await engine.get_tokenizer() is engine.tokenizer is not None
        tasks = [asyncio.create_task(_run(engine, p, params)) for p in PROMPTS]
        await _wait_until(lambda: engine.stats.num_running == len(PROMPTS), 60)
        (worker,) = _spawned_children(engine._proc.pid)
        os.kill(worker, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "WorkerError" in str(results[0]) and "rank 1" in str(results[0]), results[0]
        assert not engine.is_healthy()

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_the_core_reports_a_failed_step(model_dir):
    """The core's loop, in this process: a step that raises is reported as "dead"."""
    engine = LLMEngine(str(model_dir), **ENGINE)
    launch = engine.model_runner.launch
    calls = {"n": 0}

    def failing(plan):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("device on fire")
        return launch(plan)

    engine.model_runner.launch = failing
    ours, theirs = mp.Pipe()
    core = threading.Thread(target=_Core(engine, theirs, os.getppid()).run)
    core.start()
    try:
        ids = engine.prompt_token_ids("Hello")
        ours.send(("add", 7, ids, SamplingParams(max_tokens=50, ignore_eos=True)))
        kinds = []
        while not kinds or kinds[-1][0] == "outputs":
            assert ours.poll(30)
            kinds.append(ours.recv())
        assert kinds[-1] == ("dead", "RuntimeError: device on fire")
        deltas = [d for m in kinds[:-1] for d in m[1]]
        assert {d.request_id for d in deltas} == {7}
        assert sum(len(d.delta_token_ids) for d in deltas) >= 1
    finally:
        core.join(10)
        engine.close()
