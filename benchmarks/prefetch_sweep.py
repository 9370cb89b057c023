"""Does prefetching the next GEMM's weights into L2 (on a side stream) speed up the small-batch
decode GEMMs? The four Qwen3-0.6B decode GEMMs of 28 layers (nv's skinny GEMM, default
configurations, distinct weights) in one CUDA graph, at 1 / 16 / 64 rows, with and without
prefetch, optionally with a small kernel between GEMMs (as the norms and attention are).
It did not pay on an H200 (every prefetch variant was slower; see docs/benchmarks.md), so the
prefetch kernel lives here, not in nv-kernels.

    python benchmarks/prefetch_sweep.py
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from nv_kernels.skinny_gemm import skinny_gemm

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gemm_sweep import DT, LAYERS, SHAPES  # the same four decode GEMMs

LANES = 256  # prefetch instructions per program


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


def main() -> None:
    weights = [
        (name, torch.randn(n, k, device="cuda", dtype=DT) * 0.05, gated)
        for _ in range(LAYERS)
        for name, (n, k, gated) in SHAPES.items()
    ]
    total_mb = sum(w.numel() * 2 for _, w, _ in weights) / 1e6
    side = torch.cuda.Stream()
    flag = torch.zeros(LANES, dtype=torch.int32, device="cuda")
    print(f"{len(weights)} GEMMs, {total_mb:.0f} MB of weights")
    print(f"{'rows':>4} {'between':>7} | " + " | ".join(f"{v:>14}" for v in VARIANTS))
    for m in (1, 16, 64):
        xs = {n: torch.randn(m, k, device="cuda", dtype=DT) for n, (_, k, _) in SHAPES.items()}
        for between in (False, True):
            row = []
            for bulk, dist in VARIANTS.values():

                def run():
                    main = torch.cuda.current_stream()
                    side.wait_stream(main)
                    if dist:
                        with torch.cuda.stream(side):
                            for _, w, _ in weights[:dist]:
                                l2_prefetch(w, flag, bulk)
                    for j, (name, w, gated) in enumerate(weights):
                        if dist and j + dist < len(weights):
                            ev = torch.cuda.Event()
                            ev.record(main)
                            side.wait_event(ev)
                            with torch.cuda.stream(side):
                                l2_prefetch(weights[j + dist][1], flag, bulk)
                        x = xs[name]
                        if between:
                            x = x * 1.0
                        skinny_gemm(x, w, gated=gated)
                    main.wait_stream(side)

                run()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                t = do_bench(g.replay, warmup=5, rep=50, return_mode="median") * 1e3
                row.append(f"{t:6.0f} us {total_mb / t:4.2f}")
            print(f"{m:4d} {between!s:>7} | " + " | ".join(row))


VARIANTS = {  # label: (bulk, prefetch distance in GEMMs; 0 = none)
    "none": (True, 0),
    "bulk d=1": (True, 1),
    "bulk d=2": (True, 2),
    "line d=1": (False, 1),
    "line d=2": (False, 2),
}

if __name__ == "__main__":
    print(torch.cuda.get_device_name(0), torch.__version__)
    main()
