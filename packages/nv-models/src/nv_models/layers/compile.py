from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def compile_on_cuda(fn: F) -> F:
    """Run `fn` through torch.compile (shapes turn dynamic on first change) on CUDA tensors, eagerly
    elsewhere. Used for the small elementwise/normalisation ops between GEMMs, which eager mode
    would run as many tiny kernels; CPU stays eager so it stays bit-comparable with Hugging Face."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        nonlocal compiled
        if not x.is_cuda:
            return fn(x, *args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, fullgraph=True)
        return compiled(x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
