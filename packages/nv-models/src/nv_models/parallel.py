from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nv_kernels import PeerSignals, rms_norm_of_sum

# processes that joined a PeerAllReduce: torch's symmetric-memory rendezvous numbers its store
# keys with a process-wide counter, so a process that already joined one waits forever for a
# newly started peer (whose counter starts at 0) in the next
_joined_before = False


class PeerAllReduce:
    """All-reduce of bf16 messages through symmetric (peer-mapped) memory. NVLink multicast is
    not used; other dtypes go to NCCL.

    `all_reduce` (up to ONE_SHOT_MAX_BYTES, the embedding's): each rank copies its part into a
    buffer every peer can read, then torch's symmetric-memory kernels sum them: `one_shot` (one
    kernel reads every part) or `two_shot` (each rank reduces a slice, then gathers the others',
    in place). No ring steps, one or two launches.

    `all_reduce_rms_norm` (up to `max_bytes`) fuses a row-parallel layer's all-reduce with the
    residual add and RMSNorm after it: this rank's part goes into one of two slots, then one
    kernel meets the other ranks (a barrier in its programs' first instructions) and reads every
    rank's slot. Slots alternate, so a slot is written again only after the barrier of the call
    between, which every peer passes after it finished reading that slot. A full all-reduce (the
    embedding's, first in every forward) starts the alternation again at slot 0: every peer has
    reached it, so every earlier read is done, and a forward's slot sequence is the
    same in every CUDA graph."""

    ALGORITHMS = ("one_shot", "two_shot")
    # all_reduce_rms_norm's programs, at most (each loops over its rows one after the other, so
    # decode-sized calls get one program per row); the signal pads may bound it lower. A program
    # waits only for its namesakes on the other ranks to start, which every rank's in-order
    # dispatch of programs guarantees
    MAX_PROGRAMS = 1024
    # torch's one-shot kernel (the unfused `all_reduce`, the embedding's) beats NCCL up to a few
    # MiB and loses above (docs/benchmarks.md, the all-reduce table); larger full all-reduces go
    # to NCCL whatever max_bytes is
    ONE_SHOT_MAX_BYTES = 4 << 20

    def __init__(
        self,
        group: dist.ProcessGroup,
        device: torch.device,
        max_bytes: int,
        algorithm: str = "one_shot",
    ) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        if algorithm not in self.ALGORITHMS:
            raise ValueError(f"algorithm must be one of {self.ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        self.group_name = group.group_name
        # nv's kernels never use NVLink multicast; unless told otherwise, torch's rendezvous
        # would map a multicast object for the buffer where the GPUs support it
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        self.max_numel = n = max_bytes // 16 * 8  # slots start at 16-byte multiples
        self.one_shot_numel = m = min(n, self.ONE_SHOT_MAX_BYTES // 2)
        # [one-shot buffer (m) | slot 0 (n) | slot 1 (n)]
        self.buffer = symm_mem.empty(m + 2 * n, dtype=torch.bfloat16, device=device)
        global _joined_before
        _joined_before = True  # set before: a rendezvous that failed half-way counted too
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        self._slot_addrs = [
            torch.tensor(
                [ptr + (m + s * n) * 2 for ptr in self.handle.buffer_ptrs],
                dtype=torch.int64,
                device=device,
            )
            for s in range(2)
        ]
        self._next_slot = 0
        pads = self.handle.get_signal_pad(self.handle.rank, dtype=torch.int32).numel()
        # set by release_peers: the fused kernel's barriers read it while they wait (pinned
        # host memory, which the device reads at the same address)
        self._abort = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self._signals = PeerSignals(
            torch.tensor(self.handle.signal_pad_ptrs, dtype=torch.int64, device=device),
            self.handle.rank,
            max_programs=min(self.MAX_PROGRAMS, pads // self.handle.world_size - 1),
            abort_addr=self._abort.data_ptr(),
        )
        self._release_stream = torch.cuda.Stream(device)
        # run release_peers' kernels once now, on a scratch pad: loading a kernel waits for
        # the device, which after a peer's death never comes
        scratch = torch.zeros_like(self.handle.get_signal_pad(self.handle.rank, dtype=torch.int32))
        self._release(lambda rank: scratch)
        torch.cuda.synchronize(device)

    @staticmethod
    def unavailable(devices: list[int], mine: int) -> str | None:
        """Why this process cannot join a PeerAllReduce over the GPUs `devices` (one per rank,
        this rank's `mine`), or None. Every rank must be able to, or none may try."""
        if _joined_before:
            return (
                "this process already joined one, and torch's symmetric-memory rendezvous "
                "cannot meet newly started peers a second time"
            )
        for other in devices:
            if other != mine and not torch.cuda.can_device_access_peer(mine, other):
                return f"GPU {mine} cannot access GPU {other}'s memory (no peer-to-peer path)"
        return None

    def release_peers(self) -> None:
        """After a peer died, for a teardown: let this device's queued barriers pass without the
        other ranks; the reductions that follow read stale peer data. Call it until the device's
        queue drains.

        First the abort flag, which the fused kernel's barriers read while they wait: a store
        to host memory, no CUDA call. (A CUDA call can wait behind those barriers: loading a
        kernel, which start-up still does, waits for the device and blocks other threads'
        launches meanwhile. Rank 0 hung so on the card, with a worker killed in start-up.)
        Then torch's own barriers (the unfused `all_reduce`): slot `k * world + r` of a rank's
        signal pad is written by rank r; this sets every other rank's slots in this rank's pad
        as if they had signalled, and clears this rank's slots in theirs as if they had taken
        its signals, from a side stream, since the main one is stuck in a barrier."""
        self._abort.fill_(1)
        self._release(lambda rank: self.handle.get_signal_pad(rank, dtype=torch.int32))

    def _release(self, pad: Callable[[int], torch.Tensor]) -> None:
        me, world = self.handle.rank, self.handle.world_size
        with torch.cuda.stream(self._release_stream):
            mine = pad(me)
            for r in range(world):
                if r != me:
                    mine[r::world].fill_(1)
                    pad(r)[me::world].fill_(0)

    def device_idle(self) -> bool:
        """Whether this rank's device finished everything queued on its current stream."""
        return torch.cuda.current_stream(self.buffer.device).query()

    def abandon(self) -> None:
        """Never free this object's peer memory, for when a peer died while this device may
        still wait on it in a barrier: torch's free of symmetric memory synchronises the device
        first, which would then wait forever. The process's exit releases the memory."""
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(self))

    def handles(self, x: torch.Tensor, fused: bool = True) -> bool:
        """Whether `all_reduce_rms_norm` (fused) or `all_reduce` takes x."""
        limit = self.max_numel if fused else self.one_shot_numel
        return x.dtype == torch.bfloat16 and x.numel() <= limit and x.is_contiguous()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        part = self.buffer[: x.numel()]
        part.copy_(x.view(-1))
        if self.algorithm == "one_shot":
            torch.ops.symm_mem.one_shot_all_reduce_out(part, "sum", self.group_name, x.view(-1))
        else:
            torch.ops.symm_mem.two_shot_all_reduce_(part, "sum", self.group_name)
            x.view(-1).copy_(part)
        self.synced()
        return x

    def synced(self) -> None:
        """Every rank has passed a full all-reduce: every read of the slots before it is done."""
        self._next_slot = 0

    def next_slot(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Where the next `all_reduce_rms_norm` puts this rank's part, as a `[rows, cols]`
        tensor: a row-parallel GEMM that writes its output there spares that call its copy.
        None for a message it does not handle."""
        if dtype != torch.bfloat16 or rows * cols > self.max_numel:
            return None
        return self._slot(self._next_slot, rows * cols).view(rows, cols)

    def _slot(self, slot: int, numel: int) -> torch.Tensor:
        """The first `numel` elements of slot 0 or 1 of this rank's buffer."""
        start = self.one_shot_numel + slot * self.max_numel
        return self.buffer[start : start + numel]

    def all_reduce_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + sum of every rank's x), residual + that sum), for x it handles."""
        slot, self._next_slot = self._next_slot, 1 - self._next_slot
        part = self._slot(slot, x.numel())
        if x.data_ptr() != part.data_ptr():  # else x is there already (see next_slot)
            part.copy_(x.view(-1))
        return rms_norm_of_sum(
            self._slot_addrs[slot], x.shape[0], weight, eps, residual, peers=self._signals
        )


@dataclass(frozen=True, slots=True)
class TPGroup:
    """A tensor-parallel group as layers see it: this rank, the group size and the process group
    (None with a single rank). Passed to constructors; no layer asks torch.distributed itself.
    `peer`: an optional PeerAllReduce that takes the messages it handles. `alive_check`: raises
    once a peer is known dead (rank 0's worker pool); `check()` runs it before every collective
    call, so that none is issued behind an abort of the group, where it would wait forever."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    peer: PeerAllReduce | None = None
    alive_check: Callable[[], None] | None = None

    def check(self) -> None:
        if self.alive_check is not None:
            self.alive_check()

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """x reduced over the ranks with `op`, in place."""
        if self.size > 1:
            self.check()
            if op == dist.ReduceOp.SUM and self.peer is not None and self.peer.handles(x, False):
                return self.peer.all_reduce(x)
            dist.all_reduce(x, op=op, group=self.group)
            if self.peer is not None:
                self.peer.synced()
        return x

    def all_reduce_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(RMSNorm(residual + x reduced over the ranks), that sum) in one kernel, where the
        peer path takes x (`PeerAllReduce.all_reduce_rms_norm`); else None (reduce, then
        normalise)."""
        if self.peer is None or not self.peer.handles(x) or not residual.is_contiguous():
            return None
        self.check()
        return self.peer.all_reduce_rms_norm(x, residual, weight, eps)

    def gather_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, stacked rank after rank: `[size, *x.shape]` on every rank."""
        if self.size == 1:
            return x.unsqueeze(0)
        self.check()
        every = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        _all_gather_single(every, x.contiguous(), group=self.group)
        return every.view(self.size, *x.shape)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s x on every rank, in place."""
        if self.size > 1:
            self.check()
            dist.broadcast(x, src=src, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's shard along the last dim (all ranks get the result)."""
        if self.size == 1:
            return x
        self.check()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


# torch 2.13 renamed all_gather_into_tensor (the name torch 2.11 has)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}"
        )
    return numerator // denominator
