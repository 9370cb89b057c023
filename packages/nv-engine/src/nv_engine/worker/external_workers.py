"""Tensor-parallel ranks started outside the engine, on this machine or others (torchrun, or
`nv-engine worker` by hand), joined through torch.distributed's env:// rendezvous."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from nv_engine.config import Config
from nv_engine.worker.step_channel import EXIT
from nv_engine.worker.tp_workers import (
    carry_out,
    init_distributed,
    join_peer_memory,
    leave_group_bounded,
)
from nv_models import TPGroup


def _env_rank(config: Config) -> int:
    missing = [
        v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in os.environ
    ]
    if missing:
        raise ValueError(
            f"distributed_executor_backend='external' needs {missing} in the "
            "environment (torchrun sets them)"
        )
    world = int(os.environ["WORLD_SIZE"])
    if world != config.tensor_parallel_size:
        raise ValueError(
            f"WORLD_SIZE={world} but tensor_parallel_size={config.tensor_parallel_size}"
        )
    return int(os.environ["RANK"])


class ExternalWorkers:
    """Ranks launched outside the engine, on this machine or others (torchrun, or
    `nv-engine worker` by hand), joined through torch.distributed's env:// rendezvous.
    Rank 0, the engine, broadcasts each step's plan to them over a gloo group."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctrl: dist.ProcessGroup | None = None
        self._serving = False  # ready(): every rank is in its step loop

    def start(self) -> TPGroup:
        rank = _env_rank(self.config)
        if rank != 0:
            raise ValueError(
                f"RANK={rank}: the engine (LLM) is rank 0; run `nv-engine worker` "
                "for the other ranks"
            )
        tp = init_distributed(self.config, 0, None)
        ctrl = _control_group(self.config)
        try:
            check_same_settings(self.config, ctrl)
        except ValueError:
            dist.destroy_process_group()
            raise
        self.ctrl = ctrl
        return join_peer_memory(self.config, tp)

    def all_alive(self) -> bool:
        return True  # (see check_alive)

    def check_alive(self) -> None:
        """Remote processes cannot be watched: a dead rank surfaces as a collective timeout."""

    def poll(self) -> None:
        """(see check_alive)"""

    def ready(self) -> None:
        """The engine is built: the other ranks are in their step loops, where close() meets
        them."""
        self._serving = True

    def wait_for_failure(self, grace_s: float = 0.0) -> None:
        """Nothing to wait for (see check_alive)."""

    def send(self, plan: Any) -> None:
        dist.broadcast_object_list([plan], src=0, group=self.ctrl)

    def close(self) -> None:
        """The exit message and a barrier, which the other ranks meet in their step loops, then
        the group's destroy. Before ready() (start-up failed, likely on every rank) no rank may
        be there to meet: rank 0 leaves the group alone, bounded (on NCCL a barrier with a
        rank that never comes waits forever)."""
        ctrl, self.ctrl = self.ctrl, None
        if ctrl is None:
            return
        if not self._serving:
            leave_group_bounded()
            return
        try:
            dist.broadcast_object_list([EXIT], src=0, group=ctrl)
            dist.barrier()
        finally:
            dist.destroy_process_group()


# Settings every rank must share: with different ones, ranks would pad a step differently (graph
# sizes, eager or not), route all-reduces differently, wait for a sampled-token broadcast that
# never comes, or read the cache in another layout: a hang or wrong tokens rather than an error.
_SHARED_SETTINGS = (
    "tensor_parallel_size", "max_model_len", "max_num_seqs", "kvcache_block_size", "dtype",
    "kv_cache_dtype", "enforce_eager", "attention_backend", "async_scheduling",
)  # fmt: skip
_SHARED_TUNING = (
    "cuda_graph_batch_sizes",
    "peer_all_reduce_max_bytes",
    "peer_all_reduce_algorithm",
    "fused_sampler",
)


def check_same_settings(config: Config, ctrl: dist.ProcessGroup) -> None:
    """Every rank shows the others its settings (over the control group); all raise the same
    ValueError, naming each setting and each rank's value, when they differ. Ranks launched
    apart (`nv-engine worker`) get theirs from their own flags."""
    mine = {name: getattr(config, name) for name in _SHARED_SETTINGS}
    mine.update({name: getattr(config.tuning, name) for name in _SHARED_TUNING})
    every: list[Any] = [None] * config.tensor_parallel_size
    dist.all_gather_object(every, mine, group=ctrl)
    differ = [name for name in mine if len({repr(s[name]) for s in every}) > 1]
    if differ:
        values = "; ".join(
            f"{name}: " + ", ".join(f"rank {r} {s[name]!r}" for r, s in enumerate(every))
            for name in differ
        )
        raise ValueError(f"tensor-parallel ranks were started with different settings ({values})")


def _control_group(config: Config) -> dist.ProcessGroup:
    return dist.new_group(
        backend="gloo", timeout=timedelta(seconds=config.tuning.distributed_timeout_s)
    )


def serve_external_worker(config: Config) -> None:
    """A non-zero rank launched by hand or by torchrun: join, build this rank's shard, and run
    every plan rank 0 broadcasts until it says exit."""
    from nv_engine.worker.model_runner import ModelRunner

    rank = _env_rank(config)
    if rank == 0:
        raise ValueError("RANK=0 runs the engine (LLM); workers are ranks 1..WORLD_SIZE-1")
    tp = init_distributed(config, rank, None)
    try:
        ctrl = _control_group(config)
        check_same_settings(config, ctrl)
        tp = join_peer_memory(config, tp)
        runner = ModelRunner(config, rank, tp)
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=ctrl)
            if box[0] == EXIT:
                runner.close()  # graphs that captured collectives go before the group
                dist.barrier()
                break
            carry_out(runner, box[0])
    finally:
        dist.destroy_process_group()
