"""Triton is optional at import time (e.g. on macOS); kernels check for it when called."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton
    triton = None
    tl = None

try:  # programmatic dependent launch (Hopper+): the next kernel starts while this one runs
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton
    gdc_launch_dependents = gdc_wait = None


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


# Programmatic dependent launch (PDL). Inside `overlapped_launches()`, nv's kernels are launched
# with the PDL attribute: each lets the next kernel launch as soon as it starts, reads what no
# kernel writes (weights, step metadata copied in before the forward), then waits (`gdc_wait`)
# for the kernel before it to finish before reading activations or writing anything. Launch
# latency and the first weight loads then overlap the previous kernel. Kernels that do not take
# part (torch's, NCCL's) keep full stream ordering.
_overlap = False


@contextlib.contextmanager
def overlapped_launches(enabled: bool = True) -> Iterator[None]:
    """Launch nv's kernels with PDL inside this block, where `pdl_supported` allows it."""
    global _overlap
    previous, _overlap = _overlap, enabled
    try:
        yield
    finally:
        _overlap = previous


def use_pdl(device: torch.device) -> bool:
    """Whether a kernel launched now on `device` should use PDL."""
    return _overlap and pdl_supported(device)


def pdl_supported(device: torch.device) -> bool:
    """PDL needs a Hopper or newer GPU, CUDA 12.3+ (PDL edges in captured graphs) and a Triton
    with `gdc_wait`; never the interpreter."""
    if device.type != "cuda" or gdc_wait is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _pdl_capable(index: int) -> bool:
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    return cuda >= (12, 3) and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_kwargs(pdl: bool) -> dict:
    """Launch options for a kernel taking a `PDL` constexpr."""
    return {"PDL": pdl, "launch_pdl": True} if pdl else {"PDL": False}


pdl_wait = None
if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Let the next kernel launch, then wait for the previous one (PDL launches only)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
