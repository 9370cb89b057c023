"""Pull a tensor into L2 ahead of the kernel that reads it (CUDA, Hopper or newer).

At small decode batches every GEMM is short (4-12 MB of weights) and pays a fixed start-up cost
plus DRAM latency. Issued on a side stream while the previous kernels run, these prefetches keep
DRAM busy between the GEMMs, which then read their weights from L2. A prefetch only warms the
cache: it never changes a result.
"""

from __future__ import annotations

import torch

from nv_kernels.triton_utils import tl, triton

LANES = 256  # prefetch instructions per program

if triton is not None:

    @triton.jit
    def _l2_prefetch_kernel(
        base, nbytes, flag_ptr, BULK: tl.constexpr, SPAN: tl.constexpr, LANES: tl.constexpr
    ):
        # BULK: one SPAN (4 KB) bulk prefetch per lane (sm_90); else one 128-byte line per
        # lane, marked evict-last
        offs = (tl.program_id(0) * LANES + tl.arange(0, LANES)).to(tl.int64) * SPAN
        addr = base + tl.minimum(offs, nbytes - SPAN)  # the tail re-fetches the last span
        if BULK:
            done = tl.inline_asm_elementwise(
                "cp.async.bulk.prefetch.L2.global [$1], 4096; mov.u32 $0, 0;",
                "=r,l",
                [addr],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
        else:
            done = tl.inline_asm_elementwise(
                "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;",
                "=r,l",
                [addr],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
        tl.store(flag_ptr + tl.arange(0, LANES), done, mask=done != 0)  # never stores


def l2_prefetch(t: torch.Tensor, flag: torch.Tensor, bulk: bool = True) -> None:
    """Prefetch contiguous `t` (16-byte aligned) into L2. `flag` is any int32 CUDA tensor of
    LANES elements (never written)."""
    span = 4096 if bulk else 128
    nbytes = t.numel() * t.element_size()
    if nbytes < span:
        return
    grid = (triton.cdiv(triton.cdiv(nbytes, span), LANES),)
    _l2_prefetch_kernel[grid](
        t.data_ptr(), nbytes, flag, BULK=bulk, SPAN=span, LANES=LANES, num_warps=4
    )
