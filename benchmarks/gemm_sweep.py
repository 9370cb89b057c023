"""Small-batch GEMMs on the GPU: nv's skinny GEMM (swept configurations and the default one)
against cuBLAS (F.linear), on Qwen3-0.6B's four decode GEMMs, then the whole stack of 28 layers
x 4 GEMMs (distinct weights, so nothing stays in L2) replayed as one CUDA graph.

    python benchmarks/gemm_sweep.py
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from nv_kernels.skinny_gemm import SkinnyConfig, default_config, skinny_gemm

SHAPES = {
    "qkv": (4096, 1024),
    "o_proj": (1024, 2048),
    "gate_up": (6144, 1024),
    "down": (1024, 3072),
}
DT = torch.bfloat16


def us(fn) -> float:
    return do_bench(fn, warmup=20, rep=100, return_mode="median") * 1e3


def check(out, ref) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= 2e-2 * scale + 1e-2, (err, scale)


def sweep() -> dict[str, SkinnyConfig]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best_cfg = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=DT) * 0.05
        x = torch.randn(1, k, device="cuda", dtype=DT)
        ref = F.linear(x, w)
        t_cublas = us(lambda: F.linear(x, w))
        results = []
        for bn, bk, split, warps, stages in itertools.product(
            (16, 32, 64), (128, 256, 512), (1, 2), (4,), (3, 4)
        ):
            if k % (bk * split):
                continue
            cfg = SkinnyConfig(bn, bk, split, warps, stages)
            try:
                check(skinny_gemm(x, w, config=cfg), ref)
                results.append((us(lambda: skinny_gemm(x, w, config=cfg)), cfg))
            except Exception as e:  # out of shared memory, etc.
                print(f"  {name} {cfg} failed: {type(e).__name__}")
        results.sort(key=lambda r: r[0])
        dflt = default_config(n, k, sms)
        check(skinny_gemm(x, w), ref)
        t_dflt = us(lambda: skinny_gemm(x, w))
        gb = n * k * 2 / 1e3
        print(f"{name} N={n} K={k}: cuBLAS {t_cublas:.1f} us ({gb / t_cublas:.2f} TB/s)")
        print(f"  default {dflt}: {t_dflt:.1f} us ({gb / t_dflt:.2f} TB/s)")
        for t, cfg in results[:5]:
            print(f"  {t:6.1f} us ({gb / t:.2f} TB/s)  {cfg}")
        best_cfg[name] = results[0][1]
        for m in (4, 8, 16):
            xm = torch.randn(m, k, device="cuda", dtype=DT)
            refm = F.linear(xm, w)
            check(skinny_gemm(xm, w), refm)
            check(skinny_gemm(xm, w, config=results[0][1]), refm)
            print(
                f"  M={m:2d}: cuBLAS {us(lambda: F.linear(xm, w)):6.1f} us, default "
                f"{us(lambda: skinny_gemm(xm, w)):6.1f} us, best@1 "
                f"{us(lambda: skinny_gemm(xm, w, config=results[0][1])):6.1f} us"
            )
    return best_cfg


def stack(best: dict[str, SkinnyConfig]) -> None:
    layers = [
        {name: torch.randn(n, k, device="cuda", dtype=DT) * 0.05 for name, (n, k) in SHAPES.items()}
        for _ in range(28)
    ]
    total_mb = sum(w.numel() * 2 for layer in layers for w in layer.values()) / 1e6
    print(f"stack: 28 layers x 4 GEMMs, {total_mb:.0f} MB of weights")
    for m in (1, 4, 16, 32):
        xs = {name: torch.randn(m, k, device="cuda", dtype=DT) for name, (_, k) in SHAPES.items()}
        row = []
        for label, fn in (
            ("cublas", lambda x, w, name: F.linear(x, w)),
            ("default", lambda x, w, name: skinny_gemm(x, w)),
            ("best", lambda x, w, name: skinny_gemm(x, w, config=best[name])),
        ):
            if m > 16 and label == "best":
                continue

            def run():
                for layer in layers:
                    for name, w in layer.items():
                        fn(xs[name], w, name)

            run()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            t = us(g.replay)
            row.append(f"{label} {t:7.1f} us ({total_mb / t:.2f} TB/s)")
        print(f"  M={m:2d}: " + ", ".join(row))


if __name__ == "__main__":
    print(torch.cuda.get_device_name(0), torch.__version__)
    stack(sweep())
