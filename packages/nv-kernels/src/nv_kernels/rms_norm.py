"""RMSNorm, optionally after adding the residual, in one Triton kernel (one program per row).
The kernel can also take its input as the sum of N tensors at given device addresses: every
tensor-parallel rank's partial sums in peer-mapped memory, which fuses the all-reduce into it
(`rms_norm_of_sum`).

Rounded like Hugging Face's RMSNorm in the input dtype: the residual sum is rounded to the dtype,
normalised in float32, rounded, then multiplied by the weight and rounded again. The kernel joins
the decode graphs' programmatic-dependent-launch chain (`pdl.overlapped_launches`):
the weight is loaded before waiting on the kernel that wrote x.
"""

from __future__ import annotations

import torch

from nv_kernels.pdl import pdl_kwargs, pdl_wait, use_pdl
from nv_kernels.triton_utils import tl, triton, triton_usable


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32, the weight applied after casting back (Hugging
    Face's order). The torch path off CUDA (and the q/k norms' reference); the kernel's rounding."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        parts_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        D,
        stride_x,
        stride_r,
        eps,
        BLOCK: tl.constexpr,
        HAS_RES: tl.constexpr,
        PARTS: tl.constexpr,
        PDL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        dtype = out_ptr.dtype.element_ty
        if PARTS == 0:
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        else:  # x = the sum of PARTS [T, D] tensors (other ranks': read past L1, ".cg")
            acc = tl.zeros([BLOCK], tl.float32)
            for i in tl.static_range(PARTS):
                part = tl.load(parts_ptr + i).to(tl.pointer_type(dtype))
                part = tl.multiple_of(part, 16)  # whole rows of 16-byte multiples: vector loads
                acc += tl.load(
                    part + row * D + cols, mask=mask, other=0.0, cache_modifier=".cg"
                ).to(tl.float32)
            x = acc.to(dtype)  # rounded as an all-reduce's result is
        if HAS_RES:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_out_ptr + row * D + cols, x, mask=mask)
        x = x.to(tl.float32)
        y = (x * tl.rsqrt(tl.sum(x * x, 0) / D + eps)).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * D + cols, (w * y).to(dtype), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x `[T, D]` (rows may be strided); with `residual`, of `residual + x`, and then
    also returns that sum (the next layer's residual)."""
    if not triton_usable(x.device):
        raise RuntimeError("rms_norm_triton needs CUDA or TRITON_INTERPRET=1")
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, D] with a contiguous last dim, got {tuple(x.shape)}")
    t, d = x.shape
    if weight.shape != (d,):
        raise ValueError(f"weight must be [{d}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual must be {tuple(x.shape)} with a contiguous last dim")
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if t:
        _rms_norm_kernel[(t,)](
            x,
            x,  # no parts
            residual if residual is not None else x,
            weight,
            out,
            res_out,
            d,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            eps,
            BLOCK=triton.next_power_of_2(d),
            HAS_RES=residual is not None,
            PARTS=0,
            num_warps=4 if d <= 4096 else 8,
            **pdl_kwargs(use_pdl(x.device)),
        )
    return out if residual is None else (out, res_out)


def rms_norm_of_sum(
    part_addrs: torch.Tensor,
    rows: int,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_triton` of x = the sum of N contiguous `[rows, D]` tensors of weight's dtype
    found at the device addresses `part_addrs` (int64 `[N]`, on the device): each
    tensor-parallel rank's partial sums in peer-mapped memory, so that the all-reduce, the
    residual add and the norm are one kernel. The parts are summed in float32 in the order
    given (every rank gets the same bits) and rounded to the dtype, as the all-reduce's result
    would be. The caller makes sure the parts are written before, and not overwritten during,
    the kernel (a barrier across ranks)."""
    if not triton_usable(weight.device):
        raise RuntimeError("rms_norm_of_sum needs CUDA or TRITON_INTERPRET=1")
    if part_addrs.dtype != torch.int64 or part_addrs.dim() != 1:
        raise ValueError(
            f"part_addrs must be int64 [N], got {part_addrs.dtype} {tuple(part_addrs.shape)}"
        )
    d = weight.shape[0]
    if d % 8:
        raise ValueError(f"the hidden size must be a multiple of 8 (16-byte rows), got {d}")
    if residual is not None and (residual.shape != (rows, d) or residual.stride(-1) != 1):
        raise ValueError(f"residual must be ({rows}, {d}) with a contiguous last dim")
    out = torch.empty(rows, d, dtype=weight.dtype, device=weight.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if rows:
        _rms_norm_kernel[(rows,)](
            out,  # x: unused
            part_addrs,
            residual if residual is not None else out,
            weight,
            out,
            res_out,
            d,
            0,
            residual.stride(0) if residual is not None else 0,
            eps,
            BLOCK=triton.next_power_of_2(d),
            HAS_RES=residual is not None,
            PARTS=part_addrs.shape[0],
            num_warps=4 if d <= 4096 else 8,
            **pdl_kwargs(use_pdl(weight.device)),
        )
    return out if residual is None else (out, res_out)
