"""The tensor-parallel channel and worker lifecycle."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from nv_testing import assert_unguarded_tp2_script_fails_fast, save_tiny_qwen3

from nv_engine import LLM, SamplingParams
from nv_engine.worker.step_channel import StepChannel, StepReceiver
from nv_engine.worker.tp_workers import WorkerError, _exited, _stat_says_exiting


def _reader(name, ready, acked, parent_pid, q):
    r = StepReceiver(name, ready, acked, parent_pid)
    got = []
    while (msg := r.recv()) != "stop":
        got.append(msg)
    q.put(got)


def _sleep_a_minute():
    time.sleep(60)


def test_a_killed_worker_counts_as_exited_before_it_is_reaped():
    # rank 0 must see a dying worker at once, not when its exit ends: on GPUs that can wait
    # for rank 0 itself (NCCL maps the worker's memory), and rank 0 would then wait forever
    import signal

    proc = mp.get_context("spawn").Process(target=_sleep_a_minute)
    proc.start()
    try:
        time.sleep(0.5)
        assert not _exited(proc)
        os.kill(proc.pid, signal.SIGSTOP)  # stopped is not exiting
        assert not _exited(proc)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _exited(proc):
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.join(10)


def test_proc_stat_exiting_flag_and_zombie_are_read_past_the_name():
    # fields: pid (comm) state ppid pgrp session tty_nr tpgid flags ...; PF_EXITING = 0x4
    tail = b" 1 1 1 0 -1 %d 0 0"
    assert not _stat_says_exiting(b"42 (nv worker) S" + tail % 0x400040)
    assert _stat_says_exiting(b"42 (nv worker) S" + tail % 0x400044)  # exiting, not a zombie yet
    assert _stat_says_exiting(b"42 (a) b) Z" + tail % 0)  # the name holds ") "
    assert not _stat_says_exiting(b"42 (a) Z) R" + tail % 0)


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


def _wait_forever(name, ready, acked, parent_pid, started):
    receiver = StepReceiver(name, ready, acked, parent_pid)
    started.set()
    receiver.recv()


def test_sending_to_a_reader_killed_while_it_waits_does_not_hang():
    # a reader killed while it waits for a message: the writer's next message must not wait
    # for it (a multiprocessing Event's set() did: it waits for every sleeper in wait() to wake,
    # and rank 0 hung there on the card); the one after that finds no ack and asks alive()
    import signal
    import threading

    ctx = mp.get_context("spawn")
    ch = StepChannel(1, ctx)
    started = ctx.Event()
    reader = ctx.Process(
        target=_wait_forever, args=(ch.shm.name, ch.ready[0], ch.acked[0], os.getpid(), started)
    )
    reader.start()
    errors: list[BaseException] = []

    def alive() -> None:
        if not reader.is_alive():
            raise WorkerError("reader died")

    def send_twice() -> None:
        try:
            ch.send("first", alive)  # the reader was killed waiting: no ack will come
            ch.send("second", alive)
        except BaseException as e:
            errors.append(e)

    try:
        assert started.wait(60)
        time.sleep(0.3)  # the reader is inside recv()'s wait by now
        os.kill(reader.pid, signal.SIGKILL)
        reader.join(10)
        sender = threading.Thread(target=send_twice, daemon=True)
        sender.start()
        sender.join(10)
        assert not sender.is_alive(), "send() hung on a dead reader"
        assert len(errors) == 1 and isinstance(errors[0], WorkerError)
    finally:
        reader.kill()
        ch.close()


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
    procs[0].kill()  # not joined: rank 0 must notice by itself
    with pytest.raises(WorkerError, match="rank 1"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    # once the engine is built, the watchdog reports a death and does not abort (an abort
    # racing the step's next collective call made generate hang on the card): close() does
    assert dist.is_initialized()
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # the failed request released its blocks
    llm.close()
    assert not dist.is_initialized()
    assert not any(p.is_alive() for p in procs)


@pytest.mark.slow
def test_close_completes_when_aborting_the_group_hangs(tmp_path, monkeypatch):
    # on the card, ncclCommAbort never returned with the peer dead: the abort hangs here (rank
    # 0 only; workers are spawned), and generate must still fail naming the rank and close()
    # must still return
    import threading

    from nv_engine.worker import tp_workers

    aborts: list[str] = []
    never = threading.Event()

    def hanging_abort() -> bool:
        aborts.append(threading.current_thread().name)
        never.wait()
        return True

    monkeypatch.setattr(tp_workers, "_abort_group", hanging_abort)
    monkeypatch.setattr(tp_workers, "_ABORT_WAIT_S", 1.0)
    save_tiny_qwen3(tmp_path, seed=1)
    llm = LLM(str(tmp_path), device="cpu", tensor_parallel_size=2, kvcache_block_size=4)
    procs = list(llm._workers.procs)
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
        procs[0].kill()
        with pytest.raises(WorkerError, match="rank 1"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
        closer = threading.Thread(target=llm.close, daemon=True)
        closer.start()
        closer.join(30)  # a hang guard: close() gives the hanging abort 1 s here
        assert not closer.is_alive(), "close() waited for the hanging abort"
        # one abort, close()'s: the watchdog only reports a death once the engine is built
        assert aborts == ["nv-tp-abort"]
        assert not any(p.is_alive() for p in procs)
    finally:
        never.set()
        # the group was never destroyed (its abort "hung"): leave none for the next test
        if dist.is_initialized():
            dist.destroy_process_group()


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


def test_decode_plans_pickle_compactly():
    import pickle

    from nv_engine.core.plan import ScheduledSeq, StepPlan

    def decode_plan(history: int) -> bytes:
        row = ScheduledSeq(7, [history % 100], history - 1, list(range(history // 16 + 1)), True)
        return pickle.dumps(StepPlan(False, (row,)))

    # A decode step carries one token and the block table, never the token history.
    assert len(decode_plan(4000)) - len(decode_plan(100)) < 4 * (4000 // 16)


def test_plans_travel_to_workers_whole():
    # the plan pickles its rows as plain tuples (fast); the workers get the same plan back,
    # extras included
    import pickle

    from nv_engine import SamplingParams
    from nv_engine.core.plan import PenaltyInputs, PromptLogprobsInputs, ScheduledSeq, StepPlan

    plain = ScheduledSeq(3, [9], 40, (1, 2), True, 0.7, 5, 0.9, 0.1, 11, 4)
    extras = plain._replace(
        seq_id=4,
        banned_token_ids=(1, 2),
        logprobs=3,
        penalties=PenaltyInputs(1.1, 0.2, 0.3, (5, 6), (7,)),
        prompt_logprobs=PromptLogprobsInputs(2, (8, 9)),
        params=SamplingParams(logit_bias={5: 1.0}),
        conditional_bans=((7, 8),),
    )
    plan = StepPlan(False, (plain, extras), has_extras=True)
    back = pickle.loads(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == plan
    assert all(type(s) is ScheduledSeq for s in back.seqs)
    assert back.seqs[1].penalties.output_ids == (7,)


_ORPHAN_SCRIPT = """
import sys, time
from nv_engine import LLM
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
print(" ".join(str(p.pid) for p in llm._workers.procs), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_workers_exit_when_engine_process_is_killed(tmp_path):
    import signal
    import subprocess
    import sys

    save_tiny_qwen3(tmp_path, seed=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in pids if _pid_alive(p)]
        assert not alive, f"orphaned workers {alive}"
    finally:
        proc.kill()


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


_RANK0_SCRIPT = """
import json, sys
from nv_engine import LLM, SamplingParams
with LLM(sys.argv[1], device="cpu", tensor_parallel_size=2, kvcache_block_size=8,
         distributed_executor_backend="external", distributed_timeout_s=60) as llm:
    outs = llm.generate([[5, 6, 7, 8], [9, 10, 11]], SamplingParams(temperature=0, max_tokens=6),
                        use_tqdm=False)
print(json.dumps([o["token_ids"] for o in outs]), flush=True)
"""


def _external_ranks(model, block_size: int, **worker_kw):
    """Rank 1 as `nv-engine worker` (a Popen, with `block_size`), a function that runs rank 0
    (`_RANK0_SCRIPT`, block size 8) to completion, and the rendezvous' environment (both meet
    through MASTER_ADDR/MASTER_PORT)."""
    import subprocess
    import sys

    from nv_testing import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    argv = [sys.executable, "-m", "nv_engine", "worker", "--model", str(model), "--device", "cpu"]
    flags = ["--tensor-parallel-size", "2", "--kvcache-block-size", str(block_size)]
    worker = subprocess.Popen(argv + flags, env=dict(env, RANK="1", LOCAL_RANK="0"), **worker_kw)

    def rank0() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _RANK0_SCRIPT, str(model)],
            env=dict(env, RANK="0", LOCAL_RANK="0"),
            capture_output=True,
            text=True,
            timeout=120,
        )

    return worker, rank0, env


@pytest.mark.slow
def test_external_ranks_via_env_rendezvous(tmp_path):
    """Two "nodes" on one host, launched like torchrun: rank 0 runs the engine, rank 1 runs
    `nv-engine worker`; they meet through MASTER_ADDR/MASTER_PORT."""
    import json

    save_tiny_qwen3(tmp_path, seed=2)
    worker, rank0, _ = _external_ranks(tmp_path, 8)
    try:
        out = rank0()
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert worker.wait(30) == 0  # the worker left when the engine closed
    finally:
        worker.kill()
    with LLM(str(tmp_path), device="cpu", kvcache_block_size=8) as llm:
        ref = llm.generate(
            [[5, 6, 7, 8], [9, 10, 11]], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False
        )
    assert got == [o["token_ids"] for o in ref]


@pytest.mark.slow
def test_external_ranks_whose_start_up_fails_everywhere_leave_with_the_error(tmp_path, monkeypatch):
    """A checkpoint missing a tensor fails every rank's start-up, after the ranks met: rank 0
    (here, in this process) raises the loader's error without the exit handshake of the step
    loop, which the worker never reached (on NCCL its barrier would wait forever), and the
    worker ends too."""
    from safetensors.torch import load_file, save_file

    import nv_engine.worker.external_workers as external

    save_tiny_qwen3(tmp_path, seed=2)
    (file,) = tmp_path.glob("*.safetensors")
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    worker, _, env = _external_ranks(tmp_path, 8, stderr=subprocess.PIPE, text=True)
    try:
        for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"):
            monkeypatch.setenv(var, env[var])
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        handshakes = []
        monkeypatch.setattr(external.dist, "barrier", lambda *a, **k: handshakes.append(a))
        with pytest.raises(ValueError, match="model.norm.weight"):
            LLM(
                str(tmp_path),
                device="cpu",
                tensor_parallel_size=2,
                kvcache_block_size=8,
                distributed_executor_backend="external",
                distributed_timeout_s=30,
            )
        assert handshakes == []
        assert worker.wait(30) != 0
        assert "model.norm.weight" in worker.stderr.read()
    finally:
        worker.kill()


def test_external_backend_needs_the_rendezvous_env(tmp_path, monkeypatch):
    save_tiny_qwen3(tmp_path, seed=2)
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        LLM(
            str(tmp_path),
            device="cpu",
            tensor_parallel_size=2,
            distributed_executor_backend="external",
        )


@pytest.mark.slow
def test_failed_start_raises_its_own_error_and_leaves_no_worker(tmp_path, monkeypatch):
    import nv_engine.worker.tp_workers as workers

    def broken(config, rank, store):  # rank 0 fails to join, after its workers were spawned
        raise RuntimeError("rank 0 could not join")

    save_tiny_qwen3(tmp_path, seed=1)
    monkeypatch.setattr(workers, "init_distributed", broken)
    with pytest.raises(RuntimeError, match="rank 0 could not join"):
        LLM(str(tmp_path), device="cpu", tensor_parallel_size=2, distributed_timeout_s=20)
    assert not mp.active_children()  # the spawned worker was terminated, not left behind


@pytest.mark.slow
def test_a_start_up_failing_on_every_rank_raises_without_asking_the_workers_to_leave(
    tmp_path, monkeypatch
):
    """Every rank fails in its start-up after the group formed (a tensor missing from the
    checkpoint): LLM raises the loader's error. Rank 0 must not send the exit message nor wait
    in the leaving barrier: only workers in their step loop meet those, and on the card a
    worker failing like rank 0 sat in its group's destroy while rank 0 waited there forever."""
    from safetensors.torch import load_file, save_file

    import nv_engine.worker.tp_workers as workers

    save_tiny_qwen3(tmp_path, seed=1)
    (file,) = tmp_path.glob("*.safetensors")
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    barriers = []
    monkeypatch.setattr(workers.dist, "barrier", lambda *a, **k: barriers.append(a))
    with pytest.raises(Exception, match="model.norm.weight"):
        LLM(str(tmp_path), device="cpu", tensor_parallel_size=2, distributed_timeout_s=20)
    assert barriers == []
    assert not mp.active_children()


def test_a_script_without_the_main_guard_fails_fast_and_says_why(tmp_path):
    """Spawned workers re-import the script: without `if __name__ == "__main__":` they die at
    once. The engine says so within seconds, not after the rendezvous timeout."""
    save_tiny_qwen3(tmp_path / "m")
    assert_unguarded_tp2_script_fails_fast(tmp_path / "m", tmp_path, device="cpu")


@pytest.mark.slow
def test_external_ranks_with_different_settings_fail_at_once(tmp_path):
    """A worker launched with another block size than rank 0's: both ranks raise an error that
    names the setting and each rank's value, rather than hanging or computing wrong tokens."""
    import subprocess

    save_tiny_qwen3(tmp_path, seed=2)
    worker, rank0, _ = _external_ranks(tmp_path, 16, stderr=subprocess.PIPE, text=True)
    try:
        out = rank0()
        assert out.returncode != 0
        assert "kvcache_block_size: rank 0 8, rank 1 16" in out.stderr, out.stderr[-2000:]
        assert worker.wait(60) == 2  # the CLI's exit code for a bad setting
        assert "kvcache_block_size: rank 0 8, rank 1 16" in worker.stderr.read()
    finally:
        worker.kill()


def _trace_events(path) -> list[dict]:
    import gzip
    import json

    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


@pytest.mark.slow
def test_profiling_traces_every_rank(tmp_path, monkeypatch):
    # vLLM's start_profile()/stop_profile(): each rank writes a Chrome trace of the steps in
    # between into $NV_TORCH_PROFILER_DIR; misuse raises and leaves the profilers as they were
    save_tiny_qwen3(tmp_path / "model", seed=1)
    traces = tmp_path / "traces"
    with LLM(str(tmp_path / "model"), device="cpu", tensor_parallel_size=2) as llm:
        with pytest.raises(RuntimeError, match="NV_TORCH_PROFILER_DIR"):
            llm.start_profile()
        with pytest.raises(RuntimeError, match="not running"):
            llm.stop_profile()
        monkeypatch.setenv("NV_TORCH_PROFILER_DIR", str(traces))
        llm.start_profile()
        with pytest.raises(RuntimeError, match="already running"):
            llm.start_profile()
        want = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))
        llm.stop_profile()
        deadline = time.monotonic() + 30  # rank 1 writes its own, in its process
        while len(list(traces.glob("*.json.gz"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        files = sorted(traces.glob("*.json.gz"))
        assert [f.name.split("-")[1] for f in files] == ["rank0", "rank1"]
        for f in files:  # each holds the steps' CPU ops (on CUDA, their kernels too)
            assert any(e.get("name", "").startswith("aten::") for e in _trace_events(f))
        # the engine goes on as before
        again = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))
        assert again[0]["token_ids"] == want[0]["token_ids"]


def test_a_death_during_start_up_releases_rank_0s_peer_barriers(monkeypatch):
    """With the all-reduces in peer memory, rank 0's queued kernels meet a dead worker in a
    barrier on the device, which aborting the group does not reach: the watchdog, seeing the
    death during start-up, also releases those barriers, from close() on until the device's
    queue drains (or a bound passes), so start-up's host waits return and it can raise."""
    import threading

    import nv_engine.worker.tp_workers as workers

    class Peer:  # PeerAllReduce's two calls the release uses
        def __init__(self, drains: bool) -> None:
            self.releases, self.drains = 0, drains

        def release_peers(self) -> None:
            self.releases += 1

        def device_idle(self) -> bool:
            return self.drains

    aborts = []
    monkeypatch.setattr(workers, "_abort_group", lambda: aborts.append(1) or True)
    monkeypatch.setattr(workers, "_ABORT_WAIT_S", 0.3)
    for drains in (True, False):  # a device that never drains: released for _ABORT_WAIT_S more
        pool = workers.WorkerPool(None)  # no workers spawned: only the watchdog's logic runs
        pool._peer = peer = Peer(drains)
        monkeypatch.setattr(pool, "all_alive", lambda: False)
        pool._watch()  # sees the death at its first poll, releases, aborts, returns
        assert pool._saw_death and pool._aborted and aborts
        release = next(t for t in threading.enumerate() if t.name == "nv-tp-release")
        time.sleep(0.1)
        assert release.is_alive() and peer.releases > 1  # until close(), whatever the device
        pool._closing.set()
        release.join(2)
        assert not release.is_alive()


_EXIT_SCRIPT = """
import sys, threading, time
import torch.distributed as dist
from nv_engine.worker import tp_workers

done, never = sys.argv[1], sys.argv[2] == "never"

def abort():  # torch's abort, slower than close()'s wait (or never returning)
    if never:
        threading.Event().wait()
    time.sleep(1.0)
    open(done, "w").write("aborted")

dist.distributed_c10d._abort_process_group = abort
tp_workers._ABORT_WAIT_S, tp_workers._EXIT_WAIT_S = 0.1, 5.0 if not never else 0.5
tp_workers.leave_group_bounded()
print("left", flush=True)
"""


@pytest.mark.parametrize("abort", ["slow", "never"])
def test_the_interpreter_exit_waits_for_an_abort_still_running(tmp_path, abort):
    # close() waits _ABORT_WAIT_S for the group's abort; one that outlasts it must not come
    # back while the interpreter finalises (on the card that took the process down): the exit
    # waits for it, bounded, and an abort that never returns does not hold the exit
    script, done = tmp_path / "exit.py", tmp_path / "done"
    script.write_text(_EXIT_SCRIPT)
    r = subprocess.run(
        [sys.executable, str(script), str(done), abort], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "left\n"
    assert "waiting up to" in r.stderr  # the exit says why it waits
    assert done.exists() == (abort == "slow"), r.stderr
