"""Tensor-parallel ranks on one machine: rank 0 spawns the workers (`WorkerPool`), every rank
joins the group (`init_distributed`, `join_peer_memory`), and each worker carries out the plans
rank 0 sends it through a `StepChannel`. Ranks started elsewhere: `external_workers.py`."""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import threading
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from nv_engine.config import Config, local_device_index
from nv_engine.worker.profiler import ProfileCommand
from nv_engine.worker.step_channel import EXIT, StepChannel, StepReceiver
from nv_models import PeerAllReduce, TPGroup

logger = logging.getLogger(__name__)

_POLL_S = 0.5
_ABORT_AFTER_S = 0.1  # the watchdog: from its verdict (read before collective calls) to its abort
_ABORT_WAIT_S = 10.0  # close(): how long to wait for an abort (the watchdog's, or its own)
_EXIT_WAIT_S = 30.0  # the interpreter's exit: how long to wait for an abort still running


class WorkerError(RuntimeError):
    """A tensor-parallel worker died or stopped answering."""


_PF_EXITING = 0x4  # Linux task flag: the process has begun to exit


def _exited(proc: mp.Process) -> bool:
    """Whether a spawned worker has died or has begun to die. A killed worker can stay
    unreaped for as long as its peers hold its memory (NCCL maps it, and the CUDA driver's
    teardown waits for them), so `is_alive()` alone can say True until rank 0 lets go: rank 0
    would wait for it forever. Linux's /proc says "exiting" from the first moment."""
    if not proc.is_alive():
        return True
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            return _stat_says_exiting(f.read())
    except OSError:
        return False  # no procfs: is_alive() is all there is


def _stat_says_exiting(stat: bytes) -> bool:
    """/proc/PID/stat: a zombie, or a task flagged PF_EXITING (the name in parentheses may
    hold spaces and parentheses itself)."""
    fields = stat[stat.rindex(b")") + 2 :].split()  # from field 3, the state, on
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & _PF_EXITING)


def _exit_status(proc: mp.Process) -> str:
    return f"exit code {proc.exitcode}" if proc.exitcode is not None else "still exiting"


def _started_key(rank: int) -> str:
    return f"nv-worker-{rank}-started"


def init_distributed(config: Config, rank: int, store: dist.Store | None) -> TPGroup:
    """Join the tensor-parallel group: through `store` (spawned workers), or, with no store,
    through torch.distributed's env:// rendezvous (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""
    world = config.tensor_parallel_size
    device = config.resolved_device()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device_index(rank))
    dist.init_process_group(
        backend,
        init_method=None if store is not None else "env://",
        store=store,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=config.tuning.distributed_timeout_s),
    )
    return TPGroup(rank, world, dist.group.WORLD)


def join_peer_memory(config: Config, tp: TPGroup) -> TPGroup:
    """`tp` with the peer-memory all-reduce (`PeerAllReduce`) where the settings ask for it, the
    model runs in bf16 and every rank can set one up; else `tp` (NCCL only), rank 0 logging why
    when a rank cannot. The ranks agree first (one all-reduce of a flag), so that none waits in
    a rendezvous the others skip. It is the group's first NCCL collective: rank 0 calls it once
    its workers are watched (a dead one aborts the group), and every rank after comparing
    settings."""
    device = config.resolved_device()
    if not device.startswith("cuda") or config.peer_all_reduce_bytes() == 0:
        return tp
    if config.resolved_dtype(device) != torch.bfloat16:
        return tp  # PeerAllReduce sums bf16 only: every message would go to NCCL anyway
    gpu = torch.device("cuda", torch.cuda.current_device())
    devices = [local_device_index(r) for r in range(tp.size)]
    reason = PeerAllReduce.unavailable(devices, local_device_index(tp.rank))
    every = torch.tensor([reason is None], dtype=torch.int32, device=gpu)
    tp.all_reduce(every, op=dist.ReduceOp.MIN)
    if not every.item():
        if tp.rank == 0:
            logger.warning(
                "tensor parallelism: all-reduces through NCCL only (peer_all_reduce_max_bytes "
                "not used): %s",
                reason or "another rank cannot map its peers' memory",
            )
        return tp
    peer = PeerAllReduce(
        tp.group,
        gpu,
        config.peer_all_reduce_bytes(),
        config.tuning.peer_all_reduce_algorithm,
    )
    return replace(tp, peer=peer)


def _worker_main(
    config: Config, rank: int, port: int, shm_name: str, ready: Any, acked: Any, parent_pid: int
) -> None:
    from nv_engine.worker.model_runner import ModelRunner

    if not config.resolved_device().startswith("cuda"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        config.tensor_parallel_size,
        is_master=False,
        timeout=timedelta(seconds=config.tuning.distributed_timeout_s),
    )
    store.set(_started_key(rank), "1")  # rank 0 waits for this, watching the process
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), name="nv-parent-watch", daemon=True
    ).start()
    tp = init_distributed(config, rank, store)
    receiver = StepReceiver(shm_name, ready, acked, parent_pid)
    try:
        tp = join_peer_memory(config, tp)
        runner = ModelRunner(config, rank, tp)
        while (message := receiver.recv()) != EXIT:
            carry_out(runner, message)
        runner.close()  # graphs that captured collectives go before the group (see close())
        if os.getppid() == parent_pid:
            dist.barrier()  # leave with rank 0: tearing down early can abort a peer mid-read
    finally:
        receiver.shm.close()
        dist.destroy_process_group()


def carry_out(runner: Any, message: Any) -> None:
    """A worker's share of rank 0's message: a step's plan, or a profiler command (either
    kind of worker). The
    latter fails alone: rank 0 applied it first, and a worker that raised here would take the
    engine down with it."""
    if not isinstance(message, ProfileCommand):
        runner.execute(message)
        return
    try:
        runner.profiler.apply(message)
    except Exception:
        logger.exception("profiler command %s failed on this worker", message)


def _exit_with_parent(parent_pid: int) -> None:
    """A worker ends when the engine's process is gone, also in the middle of a collective
    that waits for rank 0 forever (NCCL's do): no worker outlives its engine."""
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    os._exit(1)


class WorkerPool:
    """Ranks 1..N-1 as spawned processes; rank 0 is the caller's process.

    Lifecycle: `start()` spawns the workers and returns the TP group for rank 0 (rendezvous on a
    TCP store that rank 0 binds to a free port); `send(plan)` broadcasts a step; `close()` tells
    workers to exit, joins them (terminating stragglers) and unlinks shared memory. Workers also
    exit by themselves when the engine process disappears.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.procs: list[mp.Process] = []
        self.channel: StepChannel | None = None
        self._closing = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._saw_death = False  # the watchdog's verdict: a worker died or began to
        # ready(): the workers are in their step loop; until then the watchdog aborts on a death
        self._serving = False
        self._aborted = False  # the watchdog aborted the group
        self._peer: PeerAllReduce | None = None  # rank 0's, once joined (start())

    def start(self) -> TPGroup:
        world = self.config.tensor_parallel_size
        timeout = timedelta(seconds=self.config.tuning.distributed_timeout_s)
        store = dist.TCPStore(
            "127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False
        )
        ctx = mp.get_context("spawn")
        self.channel = StepChannel(world - 1, ctx)
        for rank in range(1, world):
            proc = ctx.Process(
                target=_worker_main,
                name=f"nv-tp-worker-{rank}",
                daemon=True,
                args=(
                    self.config,
                    rank,
                    store.port,
                    self.channel.shm.name,
                    self.channel.ready[rank - 1],
                    self.channel.acked[rank - 1],
                    os.getpid(),
                ),
            )
            proc.start()
            self.procs.append(proc)
        self._wait_started(store)
        tp = init_distributed(self.config, 0, store)
        self._watchdog = threading.Thread(target=self._watch, name="nv-tp-watchdog", daemon=True)
        self._watchdog.start()
        # every collective call first polls: after the watchdog's abort at start-up, a collective
        # called behind it would wait forever
        tp = join_peer_memory(self.config, replace(tp, alive_check=self.poll))
        self._peer = tp.peer
        return tp

    def _watch(self) -> None:
        """From the rendezvous to close(): notice a worker's death (poll() reports it). Until
        ready(), also abort the group: a collective that waits for a dead peer never finishes
        on NCCL, nor does a host wait behind it (start-up's have no poll); aborted, it fails,
        and the call that waited raises, naming the rank (check_alive)."""
        while not self._closing.wait(_POLL_S):
            if not self.all_alive():
                self._saw_death = True
                if not self._serving:
                    # a collective call already past its check (poll) is issued
                    # before the abort, not behind it: host-side calls take microseconds
                    time.sleep(_ABORT_AFTER_S)
                    self._aborted = True
                    if self._peer is not None:
                        threading.Thread(
                            target=self._release_peer_barriers, name="nv-tp-release", daemon=True
                        ).start()
                    _abort_group()  # may never return (see close())
                return

    def _release_peer_barriers(self) -> None:
        """Start-up, after a worker's death: the peer-memory kernels rank 0 queued meet the dead
        peer in a barrier on the device, which no abort of the group reaches, so start-up's
        host waits behind them would never return. Release them (`release_peers`) until
        close(), then until the device's queue drains (at most _ABORT_WAIT_S more): the host
        waits return, and start-up's next collective call raises, naming the rank."""
        peer, deadline = self._peer, None
        while True:
            peer.release_peers()
            if self._closing.is_set():
                deadline = deadline or time.monotonic() + _ABORT_WAIT_S
                if peer.device_idle() or time.monotonic() > deadline:
                    return
            time.sleep(0.01)

    def ready(self) -> None:
        """The engine is built: from now on the step's wait notices a death (it polls), and the
        watchdog only reports one; close() aborts the group, bounded. An abort from the
        watchdog would race the steps: the engine's next collective call then waits behind an
        abort that may never return (ncclCommAbort with a dead peer did not, on the card), and
        generate hangs instead of raising."""
        self._serving = True

    def _wait_started(self, store: dist.TCPStore) -> None:
        """Wait until every worker has reached the store, failing at once, naming the rank,
        if one dies first (rather than at the rendezvous' timeout)."""
        deadline = time.monotonic() + self.config.tuning.distributed_timeout_s
        keys = [_started_key(rank) for rank in range(1, len(self.procs) + 1)]
        while not store.check(keys):
            for rank, proc in enumerate(self.procs, start=1):
                if _exited(proc):
                    raise WorkerError(
                        f"tensor-parallel worker rank {rank} exited while starting "
                        f"({_exit_status(proc)}; its error is above). Workers are spawned: a "
                        "script that makes an LLM with tensor_parallel_size > 1 needs "
                        '`if __name__ == "__main__":` around it.'
                    )
            if time.monotonic() > deadline:
                raise WorkerError(
                    "tensor-parallel workers did not start within distributed_timeout_s"
                )
            time.sleep(0.05)

    def all_alive(self) -> bool:
        return not any(_exited(p) for p in self.procs)

    def check_alive(self) -> None:
        """Raise WorkerError naming a worker that died or began to (reads /proc per worker)."""
        for rank, proc in enumerate(self.procs, start=1):
            if _exited(proc):
                raise WorkerError(
                    f"tensor-parallel worker rank {rank} exited ({_exit_status(proc)})"
                )

    def wait_for_failure(self, grace_s: float = 2.0) -> None:
        """After a collective failed: raise WorkerError if a worker exits within `grace_s`."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.check_alive()
            time.sleep(0.05)

    def poll(self) -> None:
        """check_alive for the hot path (every step, every collective call, and the step's wait
        polls it every 0.1 ms): only the cheap signs, a reaped worker or the watchdog's verdict
        (the watchdog reads /proc every _POLL_S), and the thorough check when one fires."""
        if self._saw_death or not all(p.is_alive() for p in self.procs):
            self.check_alive()

    def send(self, plan: Any) -> None:
        self.poll()
        self.channel.send(plan, self.check_alive)

    def close(self) -> None:
        """Every rank leaves the same way: the exit message, a barrier, then each destroys its
        group at the same time (NCCL's teardown waits for its peers: rank 0 must not wait for
        the workers to exit first). With a worker dead, rank 0 aborts its group instead, never
        waiting for the abort longer than _ABORT_WAIT_S: ncclCommAbort itself hung with a
        killed peer (measured), and a close() that hangs is what this must prevent. Before
        ready() (start-up failed) the workers are not in their step loop, where the exit
        message and the barrier meet them: rank 0 aborts then too. (On the card, a worker
        whose start-up failed like rank 0's waited in its group's destroy while rank 0 waited
        in the barrier.)"""
        self._closing.set()
        if self._watchdog is not None:
            self._watchdog.join(_ABORT_WAIT_S)
        clean = False
        in_loop = self._serving and self.channel is not None and bool(self.procs)
        if in_loop and not self._saw_death and self.all_alive():
            try:
                self.channel.send(EXIT, self.check_alive)
                if dist.is_initialized():
                    dist.barrier()
                clean = True
            except (WorkerError, RuntimeError):
                pass  # a worker died meanwhile: it is terminated below
        # not when start() failed before the rendezvous, nor after the watchdog's abort
        if dist.is_initialized() and not self._aborted:
            if clean:
                dist.destroy_process_group()
            else:
                leave_group_bounded()
        # workers that never joined rank 0 (start() failed) cannot leave by themselves
        deadline = time.monotonic() + (10 if clean else 0)
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.procs.clear()
        if self.channel is not None:
            self.channel.close()
            self.channel = None


def leave_group_bounded() -> None:
    """Leave the process group without meeting the peers (one died, or never reached the step
    loop): `_leave_group` in a thread, waited for at most _ABORT_WAIT_S (ncclCommAbort with a
    killed peer did not return, on the card)."""
    leave = threading.Thread(target=_leave_group, name="nv-tp-abort", daemon=True)
    leave.start()
    leave.join(_ABORT_WAIT_S)
    if leave.is_alive():
        logger.warning(
            "leaving the process group did not finish within %g s (a peer is gone, and "
            "NCCL's abort can wait for it); going on without it",
            _ABORT_WAIT_S,
        )


def _leave_group() -> None:
    """After a peer died: abort this process's groups (a destroy could wait for the dead peer
    forever), or destroy them where torch cannot abort."""
    if not _abort_group():
        dist.destroy_process_group()


_aborting: set[threading.Thread] = set()  # threads inside _abort_group


def _abort_group() -> bool:
    """Abort every process group of this process: its pending collectives fail rather than
    wait. Whether it could. Runs in a daemon thread (the watchdog's, or leave_group_bounded's),
    since it may take long or never return; the interpreter's exit waits for it, bounded
    (`_wait_for_aborts`)."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None:
        return False
    me = threading.current_thread()
    _aborting.add(me)
    try:
        abort()
        return True
    except Exception:
        logger.warning("aborting the process group failed", exc_info=True)
        return False
    finally:
        _aborting.discard(me)


@atexit.register
def _wait_for_aborts() -> None:
    """At the interpreter's exit, give an abort still running in a daemon thread up to
    _EXIT_WAIT_S to finish. A daemon thread that comes back from torch while the interpreter
    finalises takes the process down ("terminate called without an active exception": seen on
    the card, a worker killed in start-up and the group's abort outlasting close()'s wait);
    one that never comes back does no harm."""
    threads = [t for t in list(_aborting) if t is not threading.current_thread()]
    if not threads:
        return
    logger.warning("waiting up to %.0f s for the process group's abort to finish", _EXIT_WAIT_S)
    deadline = time.monotonic() + _EXIT_WAIT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
