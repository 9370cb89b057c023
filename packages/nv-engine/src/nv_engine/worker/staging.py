from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nv_engine.core.plan import TokenLogprobs


@dataclass
class _Slot:
    host: torch.Tensor  # pinned on CUDA
    host_np: np.ndarray  # the same memory, for fast writes from lists
    dev: torch.Tensor
    copied: torch.cuda.Event | None  # recorded after the slot's last copy (CUDA only)


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

    def _new_slot(self, nbytes: int) -> _Slot:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pinned)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return _Slot(host, host.numpy(), dev, torch.cuda.Event() if self._pinned else None)

    def add(self, data: list, dtype: torch.dtype) -> int:
        slot = self._slots[self._slot]
        if not self._parts and slot.copied is not None:
            slot.copied.synchronize()  # this slot's previous copy has left the host buffer
        end = self._offset + len(data) * _ITEMSIZE[dtype]
        if end > slot.host.numel():
            slot = self._grow(2 * end)
        slot.host_np[self._offset : end].view(_NP[dtype])[:] = data
        self._parts.append((self._offset, len(data), dtype))
        self._offset = (end + 15) // 16 * 16
        return len(self._parts) - 1

    def send(self) -> list[torch.Tensor]:
        slot = self._slots[self._slot]
        slot.dev[: self._offset].copy_(slot.host[: self._offset], non_blocking=True)
        if slot.copied is not None:
            slot.copied.record()
        out = [slot.dev[o : o + n * _ITEMSIZE[d]].view(d) for o, n, d in self._parts]
        self._parts = []
        self._offset = 0
        self._slot = (self._slot + 1) % len(self._slots)
        return out

    def _grow(self, nbytes: int) -> _Slot:
        old = self._slots[self._slot].host_np[: self._offset].copy()
        self._slots[self._slot] = slot = self._new_slot(nbytes)
        slot.host_np[: len(old)] = old
        return slot


_POLL_S = 1e-4  # SampledTokens.wait's polling interval


class SampledTokens:
    """A step's sampled tokens (and log-probabilities, when asked for) on their way to the
    host; `tolist()` and `logprobs()` wait for them."""

    def __init__(
        self,
        host: torch.Tensor,
        event: torch.cuda.Event | None,
        logprobs: tuple[torch.Tensor, ...] | None = None,
        prompt_logprobs: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        self._host = host
        self._event = event
        self._logprobs = logprobs
        self._prompt_logprobs = prompt_logprobs

    def wait(self, alive: Callable[[], None]) -> None:
        """Wait for the step, calling `alive()` (which raises if a peer rank died) meanwhile:
        a collective with a dead peer never finishes on NCCL."""
        if self._event is not None:
            while not self._event.query():
                alive()
                time.sleep(_POLL_S)

    def tolist(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()

    def logprobs(self) -> TokenLogprobs | None:
        return self._lists(self._logprobs)

    def prompt_logprobs(self) -> TokenLogprobs | None:
        return self._lists(self._prompt_logprobs)

    def _lists(self, tensors: tuple[torch.Tensor, ...] | None) -> TokenLogprobs | None:
        if tensors is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        return TokenLogprobs(*(t.tolist() for t in tensors))


class DeviceToHost:
    """Copies each step's sampled tokens into pinned host memory without blocking; buffers
    rotate over `depth` steps so a step's tokens stay readable while the next is queued."""

    def __init__(self, size: int, device: torch.device, depth: int = 3) -> None:
        pinned = device.type == "cuda"
        self._bufs = [torch.empty(size, dtype=torch.int64, pin_memory=pinned) for _ in range(depth)]
        self._events = [torch.cuda.Event() if pinned else None for _ in range(depth)]
        self._i = 0

    def send(
        self,
        tokens: torch.Tensor,
        logprobs: tuple[torch.Tensor, ...] | None = None,
        prompt_logprobs: tuple[torch.Tensor, ...] | None = None,
    ) -> SampledTokens:
        """`logprobs`, `prompt_logprobs`: device tensors to bring along (rarely asked for:
        fresh pinned copies)."""
        n = tokens.shape[0]
        self._i = (self._i + 1) % len(self._bufs)
        buf, event = self._bufs[self._i], self._events[self._i]
        if n > buf.shape[0]:
            buf = self._bufs[self._i] = torch.empty(
                2 * n, dtype=torch.int64, pin_memory=event is not None
            )
        host = buf[:n]
        host.copy_(tokens, non_blocking=event is not None)
        if logprobs is not None:
            logprobs = _to_host(logprobs, event is not None)
        if prompt_logprobs is not None:
            prompt_logprobs = _to_host(prompt_logprobs, event is not None)
        if event is not None:
            event.record()
        return SampledTokens(host, event, logprobs, prompt_logprobs)


def _to_host(tensors: tuple[torch.Tensor, ...], pinned: bool) -> tuple[torch.Tensor, ...]:
    """Fresh host copies (pinned, and not waited for, on CUDA)."""
    return tuple(
        torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned).copy_(t, non_blocking=pinned)
        for t in tensors
    )


_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}
_ITEMSIZE = {t: np.dtype(n).itemsize for t, n in _NP.items()}
