from __future__ import annotations

import numpy as np
import torch


class HostToDevice:
    """Packs a step's small host arrays into one pinned buffer and sends them in one copy.

    `add()` appends a list (8-byte aligned) and returns its index; `send()` issues one
    non-blocking host-to-device copy and returns device views in the order added. The host buffer
    is reused every step: `add()` first waits for the previous step's copy to finish.
    """

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.device = device
        pin = device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._np = self.host.numpy()
        self._parts: list[tuple[int, int, torch.dtype]] = []
        self._offset = 0
        self._copied = torch.cuda.Event() if pin else None

    def add(self, data: list, dtype: torch.dtype) -> int:
        if not self._parts and self._copied is not None:
            self._copied.synchronize()
        itemsize = torch.empty((), dtype=dtype).element_size()
        n = len(data)
        end = self._offset + n * itemsize
        if end > self.host.numel():
            self._grow(2 * end)
        view = self._np[self._offset : end].view(_NP[dtype])
        view[:] = data
        self._parts.append((self._offset, n, dtype))
        self._offset = (end + 7) // 8 * 8
        return len(self._parts) - 1

    def send(self) -> list[torch.Tensor]:
        nbytes = self._offset
        self.dev[:nbytes].copy_(self.host[:nbytes], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        out = [
            self.dev[o : o + n * torch.empty((), dtype=d).element_size()].view(d)
            for o, n, d in self._parts
        ]
        self._parts = []
        self._offset = 0
        return out

    def _grow(self, nbytes: int) -> None:
        old = self._np[: self._offset].copy()
        if self._copied is not None:
            self._copied.synchronize()
        pin = self.device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._np = self.host.numpy()
        self._np[: len(old)] = old


_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}
