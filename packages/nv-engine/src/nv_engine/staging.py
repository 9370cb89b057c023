from __future__ import annotations

import numpy as np
import torch


class HostToDevice:
    """Packs a step's small host arrays into one pinned buffer and sends them in one copy.

    `add()` appends a list (16-byte aligned) and returns its index; `send()` issues one
    non-blocking host-to-device copy and returns device views in the order added. Buffers rotate
    over `depth` slots, so a send waits only for the copy made `depth` sends earlier: with steps
    overlapped, the host fills step t+1's inputs while step t (and its copy) is still queued.
    """

    def __init__(self, nbytes: int, device: torch.device, depth: int = 3) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        self._slots = [self._new_slot(nbytes) for _ in range(depth)]
        self._slot = 0
        self._parts: list[tuple[int, int, torch.dtype]] = []
        self._offset = 0

    def _new_slot(self, nbytes: int) -> list:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pinned)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        event = torch.cuda.Event() if self._pinned else None
        return [host, host.numpy(), dev, event]

    def add(self, data: list, dtype: torch.dtype) -> int:
        host, np_host, _, event = self._slots[self._slot]
        if not self._parts and event is not None:
            event.synchronize()  # this slot's previous copy has left the host buffer
        itemsize = _NP[dtype]().itemsize
        n = len(data)
        end = self._offset + n * itemsize
        if end > host.numel():
            self._grow(2 * end)
            np_host = self._slots[self._slot][1]
        np_host[self._offset : end].view(_NP[dtype])[:] = data
        self._parts.append((self._offset, n, dtype))
        self._offset = (end + 15) // 16 * 16
        return len(self._parts) - 1

    def send(self) -> list[torch.Tensor]:
        host, _, dev, event = self._slots[self._slot]
        nbytes = self._offset
        dev[:nbytes].copy_(host[:nbytes], non_blocking=True)
        if event is not None:
            event.record()
        out = [dev[o : o + n * _NP[d]().itemsize].view(d) for o, n, d in self._parts]
        self._parts = []
        self._offset = 0
        self._slot = (self._slot + 1) % len(self._slots)
        return out

    def _grow(self, nbytes: int) -> None:
        old = self._slots[self._slot][1][: self._offset].copy()
        self._slots[self._slot] = slot = self._new_slot(nbytes)
        slot[1][: len(old)] = old


class SampledTokens:
    """A step's sampled tokens on their way to the host; `tolist()` waits for them."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self._host = host
        self._event = event

    def tolist(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class DeviceToHost:
    """Copies each step's sampled tokens into pinned host memory without blocking; buffers
    rotate over `depth` steps so a step's tokens stay readable while the next is queued."""

    def __init__(self, size: int, device: torch.device, depth: int = 3) -> None:
        pinned = device.type == "cuda"
        self._bufs = [torch.empty(size, dtype=torch.int64, pin_memory=pinned) for _ in range(depth)]
        self._events = [torch.cuda.Event() if pinned else None for _ in range(depth)]
        self._i = 0

    def send(self, tokens: torch.Tensor) -> SampledTokens:
        n = tokens.shape[0]
        self._i = (self._i + 1) % len(self._bufs)
        buf, event = self._bufs[self._i], self._events[self._i]
        if n > buf.shape[0]:
            buf = self._bufs[self._i] = torch.empty(
                2 * n, dtype=torch.int64, pin_memory=event is not None
            )
        host = buf[:n]
        host.copy_(tokens, non_blocking=event is not None)
        if event is not None:
            event.record()
        return SampledTokens(host, event)


_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}
