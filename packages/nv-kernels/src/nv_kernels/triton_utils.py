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


def triton_usable(device: str | object) -> bool:
    """Triton runs on CUDA, or anywhere under its interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return str(device).startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device, otherwise: int) -> int:
    """The device's SM count (grid sizing); `otherwise` off CUDA (the interpreter)."""
    if device.type != "cuda":
        return otherwise
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
