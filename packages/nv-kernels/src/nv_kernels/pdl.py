"""Programmatic dependent launch (PDL, Hopper and newer) for nv's kernels.

Inside `overlapped_launches()` (the engine's decode graphs at small batches), nv's kernels are
launched with the PDL attribute: each lets the next kernel launch as soon as it starts, reads
only what no kernel writes (weights, step metadata copied in before the forward), then waits
(`gdc_wait`) for the kernel before it to finish before reading activations or writing anything.
Launch latency and the first weight loads then overlap the previous kernel. Kernels that do not
take part (torch's, cuBLAS's, NCCL's) keep full stream ordering, so mixing them is safe.

A kernel takes part with a `PDL: tl.constexpr` parameter, `pdl_wait(PDL)` before its first
dependent access, and `**pdl_kwargs(use_pdl(device))` at launch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from nv_kernels.triton_utils import interpreting, tl, triton

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton, or none
    gdc_launch_dependents = gdc_wait = None

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
    if device.type != "cuda" or gdc_wait is None or interpreting():
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
