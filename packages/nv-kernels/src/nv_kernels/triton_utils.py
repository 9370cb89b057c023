"""Triton is optional at import time (e.g. on macOS); kernels check for it when called."""

from __future__ import annotations

import os

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
