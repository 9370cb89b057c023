"""The shared-memory channel rank 0 sends each step's plan to its spawned workers through."""

from __future__ import annotations

import os
import pickle
import uuid
from multiprocessing.shared_memory import SharedMemory
from typing import Any

_HEADER = 8  # payload length, little endian
_RESIZE = "__nv_resize__"
_WAIT_S = 0.5  # a reader checks that its engine's process is still there this often
EXIT = "__nv_exit__"  # the message that ends a worker's loop (either kind of worker)


class StepChannel:
    """One writer (rank 0), N readers, through a uniquely named shared-memory segment.

    Every message is acknowledged by each reader before the next one is written, so a slow reader
    never sees a half-overwritten message. A message larger than the segment makes the writer
    move everyone to a larger segment first (a small resize message travels in the old one).

    `ready` and `acked` are semaphores, one pair per reader: releasing one never waits for the
    other side. (A multiprocessing Event's set() waits for every process sleeping in its wait()
    to wake, and a reader killed there never does: rank 0 hung in set(), measured on NCCL.)
    """

    def __init__(self, num_readers: int, ctx: Any, size: int = 1 << 20) -> None:
        self.shm = SharedMemory(create=True, size=size, name=_unique_name())
        self._retired: list[SharedMemory] = []
        self.ready = [ctx.Semaphore(0) for _ in range(num_readers)]
        self.acked = [ctx.Semaphore(1) for _ in range(num_readers)]

    def send(self, obj: Any, alive: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if _HEADER + len(data) > self.shm.size:
            new = SharedMemory(
                create=True, size=max(2 * self.shm.size, 2 * len(data)), name=_unique_name()
            )
            self._write(pickle.dumps((_RESIZE, new.name)), alive)
            self._retired.append(self.shm)
            self.shm = new
        self._write(data, alive)

    def _write(self, data: bytes, alive: Any) -> None:
        for acked in self.acked:
            while not acked.acquire(timeout=_WAIT_S):
                alive()
        self.shm.buf[:_HEADER] = len(data).to_bytes(_HEADER, "little")
        self.shm.buf[_HEADER : _HEADER + len(data)] = data
        for ready in self.ready:
            ready.release()

    def close(self) -> None:
        for shm in [self.shm, *self._retired]:
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


class StepReceiver:
    """A worker's end of the StepChannel."""

    def __init__(self, name: str, ready: Any, acked: Any, parent_pid: int) -> None:
        self.shm = SharedMemory(name=name)
        self.ready, self.acked = ready, acked
        self.parent_pid = parent_pid

    def recv(self) -> Any:
        while True:
            while not self.ready.acquire(timeout=_WAIT_S):
                if os.getppid() != self.parent_pid:
                    return EXIT  # the engine process is gone: leave, don't linger
            n = int.from_bytes(self.shm.buf[:_HEADER], "little")
            obj = pickle.loads(self.shm.buf[_HEADER : _HEADER + n])
            if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == _RESIZE:
                self.shm.close()
                self.shm = SharedMemory(name=obj[1])
                self.acked.release()
                continue
            self.acked.release()
            return obj


def _unique_name() -> str:
    return f"nv-{os.getpid()}-{uuid.uuid4().hex[:12]}"
