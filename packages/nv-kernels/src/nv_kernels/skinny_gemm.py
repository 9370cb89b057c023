"""y = x W^T for few rows of x (decode at small batch), where the work is reading W.

cuBLAS picks tensor-core tiles for these shapes that read a 4-12 MB weight at about 1 TB/s on an
H200 (a quarter of its bandwidth). This kernel splits W's output features over the SMs; the rows of
x, padded to 16, ride along in one tensor-core dot per tile. It can also split K (then a second
small kernel sums the partial products: deterministic, no atomics).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nv_kernels.triton_utils import num_sms, tl, triton, triton_usable

MAX_ROWS = 16  # decode batches up to this size take the kernel; larger ones go to cuBLAS


class SkinnyConfig(NamedTuple):
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


if triton is not None:

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_x,
        stride_w,
        stride_out,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # Program (n, s): output features [n * BLOCK_N, +BLOCK_N) over the s-th of SPLIT_K equal
        # slices of K. With SPLIT_K > 1, out is a float32 [SPLIT_K, M, N] buffer of partials.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_len
        k_hi = tl.minimum(k_lo + k_len, K)
        x_ptrs = x_ptr + rm[:, None] * stride_x + (k_lo + rk)[None, :]
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_w + (k_lo + rk)[None, :]
        m_ok = rm[:, None] < M
        n_ok = rn[:, None] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=m_ok, other=0.0)
                w = tl.load(w_ptrs, mask=n_ok, other=0.0)
            else:
                k_ok = (k + rk)[None, :] < k_hi
                x = tl.load(x_ptrs, mask=m_ok & k_ok, other=0.0)
                w = tl.load(w_ptrs, mask=n_ok & k_ok, other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            dst = out_ptr + rm[:, None] * stride_out + rn[None, :]
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            dst = out_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :]
            tl.store(dst, acc, mask=mask)

    @triton.jit
    def _split_k_sum_kernel(
        part_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        stride_out,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
        n = offs % N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
        dst = out_ptr + (offs // N) * stride_out + n
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(n: int, k: int, num_sms: int) -> SkinnyConfig:
    """The widest feature tile that still gives half the SMs a program. On an H200 (132 SMs)
    `benchmarks/gemm_sweep.py` found splitting K (two kernels) slower than leaving SMs idle at
    these sizes, so K is not split by default."""
    block_k = 256 if k % 256 == 0 else 128
    block_n = next((b for b in (64, 32) if -(-n // b) >= num_sms // 2), 16)
    return SkinnyConfig(block_n, block_k, 1)


def use_skinny_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `skinny_gemm` should run `F.linear(x, weight)`: a CUDA half-precision matmul with
    at most MAX_ROWS rows."""
    return (
        x.is_cuda
        and triton is not None
        and x.dim() == 2
        and x.shape[0] <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
    )


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x `[M, K]` with M <= 64, weight `[N, K]` (both with a
    contiguous last dim). float32 inputs use IEEE products (for the interpreter tests)."""
    if not triton_usable(x.device):
        raise RuntimeError("skinny_gemm needs CUDA or TRITON_INTERPRET=1")
    m, k = x.shape
    n, k_w = weight.shape
    if k_w != k:
        raise ValueError(f"weight has {k_w} input features, x has {k}")
    if m > 64:
        raise ValueError(f"skinny_gemm takes at most 64 rows, got {m}")
    if config is None:
        config = default_config(n, k, num_sms(x.device, otherwise=132))
    block_m = max(16, triton.next_power_of_2(m))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = config.split_k
    dst = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else weight  # never read without HAS_BIAS
    _skinny_gemm_kernel[(triton.cdiv(n, config.block_n), split)](
        x,
        weight,
        bias_arg,
        dst,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=split,
        EVEN_K=k % (split * config.block_k) == 0,
        IEEE=x.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split > 1:
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(m * n, block),)](
            dst,
            bias_arg,
            out,
            m,
            n,
            out.stride(0),
            HAS_BIAS=bias is not None,
            SPLIT_K=split,
            BLOCK=block,
        )
    return out
