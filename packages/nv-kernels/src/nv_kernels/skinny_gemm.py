"""y = x W^T for a decode batch (the engine uses it up to DISPATCH_ROWS rows), where the work is
reading W.

cuBLAS picks tiles for these shapes that read the weight at a fraction of the card's bandwidth
(docs/benchmarks.md, small-batch GEMM). This kernel splits W's output features over the SMs, and
K too when there are too few feature tiles to fill them; the rows of x ride along in one
tensor-core dot per tile.

Split K is summed in the same launch: each program writes its float32 partial tile and bumps the
tile's counter, and the program that arrives last adds the partials in split order (the same
order whichever program is last, so results are deterministic) and writes the output. The counters
live in `triton_utils.tile_counters`, reset by that last program.

`gated=True` computes a SwiGLU MLP's first half, silu(x Wg^T) * (x Wu^T) with W = [Wg; Wu], in the
same tile (the activation is applied once the tile's sums are complete).

Under programmatic dependent launch (`pdl.overlapped_launches`, the decode graphs at
small batches) a program loads its first weight tile before waiting for the kernel that wrote
x, and the PDL tile defaults make that tile large and the grid smaller than the GPU, so the next
GEMM's programs load their weights on the idle SMs while this one finishes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nv_kernels.pdl import pdl_kwargs, pdl_wait, use_pdl
from nv_kernels.triton_utils import (
    NUM_COUNTERS,
    num_sms,
    tile_counters,
    tl,
    triton,
    triton_usable,
)

MAX_ROWS = 256  # the kernel takes at most this many rows (in tiles of up to 64)
DISPATCH_ROWS = 64  # `use_skinny_gemm`: batches up to this size take the kernel, larger ones cuBLAS


class SkinnyConfig(NamedTuple):
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = 0  # rows per tile; 0: the batch rounded up to a power of two, 16 to 64


if triton is not None:

    @triton.jit
    def _mma(x, w, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        return tl.dot(x, tl.trans(w), acc)

    @triton.jit
    def _load_w(w_ptrs, u_ptrs, n_ok, rk, k, k_hi, EVEN_K: tl.constexpr, GATED: tl.constexpr):
        """The weight tile at K offset k (and the up half's, with GATED); zeros past k_hi."""
        if EVEN_K:
            mask = n_ok
        else:
            mask = n_ok & ((k + rk)[None, :] < k_hi)
        w = tl.load(w_ptrs, mask=mask, other=0.0)
        if GATED:
            return w, tl.load(u_ptrs, mask=mask, other=0.0)
        return w, w

    @triton.jit
    def _tile_mma(x_ptrs, m_ok, rk, k, k_hi, w, u, acc, acc_up, EVEN_K, GATED, IEEE):
        """acc (+)= x_tile w^T (and acc_up with u) for the K tile at offset k."""
        if EVEN_K:
            x_mask = m_ok
        else:
            x_mask = m_ok & ((k + rk)[None, :] < k_hi)
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc = _mma(x, w, acc, IEEE)
        if GATED:
            acc_up = _mma(x, u, acc_up, IEEE)
        return acc, acc_up

    @triton.jit
    def _store_tile(acc, acc_up, bias_ptr, out_ptr, rm, rn, M, N, stride_out, GATED, HAS_BIAS):
        n_ok = rn < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(bias_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        dtype = out_ptr.dtype.element_ty
        if GATED:
            # rounded like the unfused path's GEMM output, then silu(gate) * up in float32
            gate = acc.to(dtype).to(tl.float32)
            acc = gate / (1.0 + tl.exp(-gate)) * acc_up.to(dtype).to(tl.float32)
        dst = out_ptr + rm[:, None] * stride_out + rn[None, :]
        tl.store(dst, acc.to(dtype), mask=(rm[:, None] < M) & n_ok[None, :])

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        out_ptr,
        part_ptr,
        count_ptr,
        M,
        N,
        K,
        stride_x,
        stride_w,
        stride_out,
        GATED: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # Program (n, s, m): rows [m * BLOCK_M, +BLOCK_M) x output features [n * BLOCK_N,
        # +BLOCK_N), over the s-th of SPLIT_K equal slices of K. With GATED, W has 2N rows (gate
        # then up) and the program computes both tiles.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_len
        k_hi = tl.minimum(k_lo + k_len, K)
        x_ptrs = x_ptr + rm[:, None] * stride_x + (k_lo + rk)[None, :]
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_w + (k_lo + rk)[None, :]
        u_ptrs = w_ptrs + N * stride_w
        m_ok = rm[:, None] < M
        n_ok = rn[:, None] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # The first K tile's weights are loaded before waiting on the kernel that wrote x (PDL):
        # no kernel writes weights, so they may be read while that kernel still runs. The loop
        # over the other tiles is left to the compiler's software pipelining.
        w, u = _load_w(w_ptrs, u_ptrs, n_ok, rk, k_lo, k_hi, EVEN_K, GATED)
        pdl_wait(PDL)
        acc, acc_up = _tile_mma(
            x_ptrs, m_ok, rk, k_lo, k_hi, w, u, acc, acc_up, EVEN_K, GATED, IEEE
        )
        for k in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
            w, u = _load_w(w_ptrs, u_ptrs, n_ok, rk, k, k_hi, EVEN_K, GATED)
            acc, acc_up = _tile_mma(
                x_ptrs, m_ok, rk, k, k_hi, w, u, acc, acc_up, EVEN_K, GATED, IEEE
            )
        if SPLIT_K == 1:
            _store_tile(acc, acc_up, bias_ptr, out_ptr, rm, rn, M, N, stride_out, GATED, HAS_BIAS)
        else:
            # float32 partials [SPLIT_K, 1 + GATED, M, N]
            part_mask = m_ok & (rn[None, :] < N)
            part = part_ptr + rm[:, None] * N + rn[None, :]
            split_stride = (1 + GATED) * M * N
            tl.store(part + pid_k * split_stride, acc, mask=part_mask)
            if GATED:
                tl.store(part + pid_k * split_stride + M * N, acc_up, mask=part_mask)
            counter = count_ptr + pid_m * tl.num_programs(0) + pid_n
            # acq_rel: this program's partials are visible before its count is; the last
            # program sees everyone's partials after reading the count
            if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    src = part + s * split_stride
                    acc += tl.load(src, mask=part_mask, other=0.0, cache_modifier=".cg")
                    if GATED:
                        acc_up += tl.load(
                            src + M * N, mask=part_mask, other=0.0, cache_modifier=".cg"
                        )
                tl.atomic_xchg(counter, 0)  # ready for the next launch
                _store_tile(
                    acc, acc_up, bias_ptr, out_ptr, rm, rn, M, N, stride_out, GATED, HAS_BIAS
                )


def default_config(
    m: int, n: int, k: int, num_sms: int, pdl: bool = False, gated: bool = False
) -> SkinnyConfig:
    """From `benchmarks/gemm_sweep.py` and `benchmarks/pdl_sweep.py` on an H200 (Qwen3-0.6B's
    four decode GEMMs); within ~5 % of the best swept configuration of each. n counts output
    features (half the weight's rows when gated).

    Plain launches: 32-feature tiles, K in 128-wide steps, and K split (in halves) while fewer
    than half the SMs would get a program. PDL launches of up to 16 rows: 64-feature tiles (32
    when gated, which loads two) and 256-wide K steps, so that the first tile, loaded before the
    wait, is a large share of a program's weights; K split while fewer than a quarter of the SMs
    would get a program."""
    stages = 4
    if pdl and m <= 16:
        block_k = 256 if k % 256 == 0 else 128 if k % 128 == 0 else 64
        block_n, share = (32 if gated else 64), 4
    else:
        block_k = 128 if k % 128 == 0 else 64
        block_n, share = 32, 2
    programs = -(-n // block_n) * -(-m // 64)
    split = 1
    while share * programs * split < num_sms and k % (2 * split * block_k) == 0 and split < 8:
        split *= 2
    if pdl and k <= split * block_k:
        stages = 2  # one K tile per program: nothing to pipeline
    return SkinnyConfig(block_n, block_k, split, 4, stages)


def _default_block_m(m: int) -> int:
    """The tile height for m rows: the next power of two, from 16 to 64."""
    return min(64, max(16, 1 << (m - 1).bit_length()))


def skinny_variant_rows(max_rows: int = DISPATCH_ROWS) -> list[int]:
    """One row count for each variant of the kernel that launches of 1..max_rows rows compile
    (with the default tile height, one per height of 16, 32 or 64 rows, times Triton's
    specialisation of M: 1, a multiple of 16, any other). A step that runs each once has them
    all compiled: a kernel compiled in the middle of serving stalls every request."""
    first: dict[tuple[int, bool, bool], int] = {}
    for m in range(1, max_rows + 1):
        first.setdefault((_default_block_m(m), m == 1, m % 16 == 0), m)
    return sorted(first.values())


def use_skinny_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `skinny_gemm` should run `F.linear(x, weight)`: a CUDA half-precision matmul with
    at most DISPATCH_ROWS rows."""
    return (
        x.is_cuda
        and triton is not None
        and x.dim() == 2
        and x.shape[0] <= DISPATCH_ROWS
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
    gated: bool = False,
    pdl: bool | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x `[M, K]` with M <= MAX_ROWS, weight `[N, K]` (both with
    a contiguous last dim). With `gated`, weight is `[2N, K]` (and bias `[2N]`) and the result is
    `silu(y[:, :N]) * y[:, N:]`. float32 inputs use IEEE products (for the interpreter tests).
    `pdl`: launch with programmatic dependent launch (default: inside `overlapped_launches`)."""
    if not triton_usable(x.device):
        raise RuntimeError("skinny_gemm needs CUDA or TRITON_INTERPRET=1")
    m, k = x.shape
    n, k_w = weight.shape
    if k_w != k:
        raise ValueError(f"weight has {k_w} input features, x has {k}")
    if m > MAX_ROWS:
        raise ValueError(f"skinny_gemm takes at most {MAX_ROWS} rows, got {m}")
    if gated:
        if n % 2:
            raise ValueError(f"gated weight needs an even number of rows, got {n}")
        n //= 2
    if pdl is None:
        pdl = use_pdl(x.device)
    if config is None:
        config = default_config(m, n, k, num_sms(x.device, otherwise=132), pdl, gated)
    block_m = config.block_m or _default_block_m(m)
    n_tiles, m_tiles = triton.cdiv(n, config.block_n), triton.cdiv(m, block_m)
    split = config.split_k
    if split > 1 and n_tiles * m_tiles > NUM_COUNTERS:
        raise ValueError(
            f"split K needs at most {NUM_COUNTERS} output tiles, got {n_tiles * m_tiles}"
        )
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if split > 1:
        part = torch.empty(split, 1 + gated, m, n, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device)
    else:
        part = counters = out  # never touched
    _skinny_gemm_kernel[(n_tiles, split, m_tiles)](
        x,
        weight,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        out,
        part,
        counters,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        GATED=gated,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=split,
        EVEN_K=k % (split * config.block_k) == 0,
        IEEE=x.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_kwargs(pdl),
    )
    return out
