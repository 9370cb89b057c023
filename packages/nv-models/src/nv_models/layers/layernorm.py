from __future__ import annotations

import torch
from torch import nn

from nv_kernels import rms_norm_ref, rms_norm_triton, triton
from nv_models.layers.compile import compile_on_cuda
from nv_models.parallel import TPGroup

rms_norm = compile_on_cuda(rms_norm_ref)


@compile_on_cuda
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = residual + x
    return rms_norm_ref(x, weight, eps), x


class RMSNorm(nn.Module):
    """`forward(x)` normalises; `forward(x, residual)` first adds the residual and returns
    (normed, new_residual), fused into one kernel on CUDA (nv's Triton kernel for the usual
    [tokens, hidden] activations, which joins the decode graphs' PDL chain).

    With a tensor-parallel `tp`, the x of `forward(x, residual)` is this rank's partial sum (a
    `RowParallelLinear(reduce_results=False)`'s output), reduced here first: through
    PeerAllReduce in the same kernel as the add and the norm where it takes x, else an
    all-reduce before them."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.tp = tp if tp is not None and tp.size > 1 else None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.tp is not None and residual is not None:
            fused = self.tp.all_reduce_rms_norm(x, residual, self.weight, self.eps)
            if fused is not None:
                return fused
            x = self.tp.all_reduce(x)
        if _rows_for_triton(x) and (residual is None or _rows_for_triton(residual)):
            return rms_norm_triton(x, self.weight, self.eps, residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def _rows_for_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton is not None and t.dim() == 2 and t.stride(-1) == 1
