from __future__ import annotations

import torch
import torch.nn.functional as F

from nv_models.layers.compile import compile_on_cuda


@compile_on_cuda
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2d] -> silu(x[..., :d]) * x[..., d:] (what `GateUpParallelLinear` applies where the
    skinny GEMM's epilogue does not)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
