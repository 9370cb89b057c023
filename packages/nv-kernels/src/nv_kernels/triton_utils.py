"""Triton is optional at import time (e.g. on macOS); kernels check for it when called."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton
    triton = None
    tl = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1: as Python, on CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: str | object) -> bool:
    """Triton runs on CUDA, or anywhere under its interpreter."""
    if triton is None:
        return False
    return str(device).startswith("cuda") or interpreting()


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device, otherwise: int) -> int:
    """The device's SM count (grid sizing); `otherwise` off CUDA (the interpreter)."""
    if device.type != "cuda":
        return otherwise
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


NUM_COUNTERS = 1 << 14
_counters: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device) -> torch.Tensor:
    """A zeroed int32 buffer of NUM_COUNTERS per device, for kernels whose last-arriving program
    of a group finishes the group's work (the skinny GEMM's split-K sums). Each kernel sets
    the counters it used back to zero, so launches must not run concurrently on one device (the
    engine runs its forward on one stream)."""
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("tile_counters: first use must come before CUDA graph capture")
        counters = _counters[device] = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)
    return counters
