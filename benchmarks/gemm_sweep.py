"""Decode GEMMs on the GPU: nv's skinny GEMM (swept configurations and the default one) against
cuBLAS on a model's four decode GEMMs (Qwen3-0.6B's by default), at decode batch sizes from 1 to
256 rows. gate_up is the gated form (cuBLAS + the compiled silu_and_mul, as the model runs it
without the kernel).

Every time is per launch, from one launch per layer on distinct weights (so nothing stays in L2)
replayed as one CUDA graph; the last table adds the four GEMMs of all layers interleaved, as in
a step.

    python benchmarks/gemm_sweep.py [--defaults | --wide] [--shape 0.6b|8b|8b-tp2] [rows ...]
        --defaults: no sweep; --wide: sweep 64-128-row tiles (for 65-256 rows);
        --shape: the model's GEMMs (8b-tp2: one rank's shard of Qwen3-8B's at TP=2)
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from nv_kernels.skinny_gemm import SkinnyConfig, default_config, skinny_gemm
from nv_models.layers.activation import silu_and_mul

MODELS = {  # --shape: ({name: (weight rows, K, gated)}, layers)
    "0.6b": (
        {
            "qkv": (4096, 1024, False),
            "o_proj": (1024, 2048, False),
            "gate_up": (6144, 1024, True),
            "down": (1024, 3072, False),
        },
        28,
    ),
    "8b": (
        {
            "qkv": (6144, 4096, False),
            "o_proj": (4096, 4096, False),
            "gate_up": (24576, 4096, True),
            "down": (4096, 12288, False),
        },
        36,
    ),
    "8b-tp2": (
        {
            "qkv": (3072, 4096, False),
            "o_proj": (4096, 2048, False),
            "gate_up": (12288, 4096, True),
            "down": (4096, 6144, False),
        },
        36,
    ),
}
SHAPES, LAYERS = MODELS["0.6b"]
DT = torch.bfloat16
SMEM = 200 * 1024  # bytes of shared memory the pipeline may use


def graph_us(run, launches: int | None = None) -> float:
    """Time of `run` captured once as a CUDA graph and replayed, µs per launch (`run` makes
    `launches` of them, LAYERS by default; 1: per replay)."""
    launches = LAYERS if launches is None else launches
    run()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return do_bench(g.replay, warmup=5, rep=40, return_mode="median") * 1e3 / launches


def candidates(m: int, k: int, gated: bool):
    block_m = min(64, max(16, 1 << (m - 1).bit_length()))
    block_ks = (64, 128, 256) if block_m == 64 else (128, 256)
    splits = (1, 2, 4, 8) if block_m == 16 else (1, 2, 4)
    warps = (4, 8) if block_m == 64 else (4,)
    for bn, bk, split, w in itertools.product((16, 32, 64), block_ks, splits, warps):
        stage = (block_m + bn * (1 + gated)) * bk * 2
        stages = min(4, SMEM // stage)
        if k % (bk * split) == 0 and stages >= 2:
            yield SkinnyConfig(bn, bk, split, w, stages)


def candidates_wide(m: int, k: int, gated: bool, n_tiles_64: int):
    """Compute-shaped tiles for 65-256 rows: 64-128 rows x 64-128 features, K in 64/128 steps;
    K split only where too few tiles fill the SMs (`n_tiles_64`: 64-wide feature tiles)."""
    shapes = [(64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 64, 4), (128, 64, 8), (128, 128, 8)]
    splits = (1, 2) if n_tiles_64 >= 64 else (1, 2, 4)
    for (bm, bn, w), bk, split in itertools.product(shapes, (64, 128), splits):
        stages = 4 if bk == 64 else 3
        if (bm + bn * (1 + gated)) * bk * 2 * stages > SMEM:
            stages -= 1
        if k % (bk * split) == 0:
            yield SkinnyConfig(bn, bk, split, w, stages, bm)


def cublas(x, w, gated):
    return silu_and_mul(F.linear(x, w)) if gated else F.linear(x, w)


def check(out, ref) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= 2e-2 * scale + 1e-2, (err, scale)


def layer_weights() -> dict[str, list[torch.Tensor]]:
    """Distinct random weights of every layer for each of SHAPES (on the GPU)."""
    return {
        name: [torch.randn(n, k, device="cuda", dtype=DT) * 0.05 for _ in range(LAYERS)]
        for name, (n, k, _) in SHAPES.items()
    }


def main(rows: list[int], sweep: bool, wide: bool = False) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    weights = layer_weights()
    summary = []
    for m in rows:
        xs = {
            name: torch.randn(m, k, device="cuda", dtype=DT) for name, (_, k, _) in SHAPES.items()
        }
        tot = {"cublas": 0.0, "default": 0.0, "best": 0.0}
        best_cfgs = {}
        for name, (n, k, gated) in SHAPES.items():
            x, ws = xs[name], weights[name]
            n_out = n // 2 if gated else n
            ref = cublas(x, ws[0], gated)
            t_cublas = graph_us(lambda: [cublas(x, w, gated) for w in ws])
            dflt = default_config(m, n_out, k, sms)
            check(skinny_gemm(x, ws[0], gated=gated), ref)
            t_dflt = graph_us(lambda: [skinny_gemm(x, w, gated=gated) for w in ws])
            results = []
            if not sweep:
                cands = [dflt]
            elif wide:
                cands = candidates_wide(m, k, gated, -(-n_out // 64))
            else:
                cands = candidates(m, k, gated)
            for cfg in cands:
                try:
                    check(skinny_gemm(x, ws[0], config=cfg, gated=gated), ref)
                    t = graph_us(lambda: [skinny_gemm(x, w, config=cfg, gated=gated) for w in ws])
                    results.append((t, cfg))
                except Exception as e:  # out of resources, etc.
                    print(f"  M={m} {name} {cfg} failed: {type(e).__name__}: {str(e)[:80]}")
            results.sort(key=lambda r: r[0])
            t_best, cfg_best = results[0]
            best_cfgs[name] = cfg_best
            mb = n * k * 2 / 1e6
            print(
                f"M={m:3d} {name:7s} cuBLAS {t_cublas:5.1f} us ({mb / t_cublas:.2f} TB/s) | "
                f"default {t_dflt:5.1f} ({mb / t_dflt:.2f}) {tuple(dflt)} | "
                f"best {t_best:5.1f} ({mb / t_best:.2f}) {tuple(cfg_best)}"
            )
            for t, cfg in results[1:4]:
                print(f"      next {t:5.1f} us {tuple(cfg)}")
            tot["cublas"] += t_cublas * LAYERS
            tot["default"] += t_dflt * LAYERS
            tot["best"] += t_best * LAYERS

        # the four GEMMs of every layer interleaved, as the model runs them
        def step(fn):
            def run():
                for i in range(LAYERS):
                    for name, (_, _, gated) in SHAPES.items():
                        fn(xs[name], weights[name][i], name, gated)

            return graph_us(run, launches=1)

        t_step_cublas = step(lambda x, w, name, gated: cublas(x, w, gated))
        t_step_dflt = step(lambda x, w, name, gated: skinny_gemm(x, w, gated=gated))
        t_step_best = step(
            lambda x, w, name, gated: skinny_gemm(x, w, config=best_cfgs[name], gated=gated)
        )
        summary.append(
            (m, tot["cublas"], tot["default"], tot["best"], t_step_cublas, t_step_dflt, t_step_best)
        )
    print("\nrows | sum of 4x28 launches: cuBLAS / default / best (us) | step graph: same")
    for m, a, b, c, d, e, f in summary:
        print(f"{m:4d} | {a:7.0f} / {b:7.0f} / {c:7.0f} | {d:7.0f} / {e:7.0f} / {f:7.0f}")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(0), torch.__version__)
    args = sys.argv[1:]
    if "--shape" in args:
        SHAPES, LAYERS = MODELS[args[args.index("--shape") + 1]]
    main(
        [int(a) for a in args if a.isdigit()] or [1, 4, 16, 32, 64, 128, 256],
        "--defaults" not in args,
        "--wide" in args,
    )
