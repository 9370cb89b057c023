"""Programmatic dependent launch (PDL) for the decode layer at small batches, on the GPU.

A PDL kernel may start while the kernel before it still runs: the skinny GEMM loads its first
weight tile, then waits (`gdc_wait`) for the kernel that wrote its input. Each variant replays
28 layers of Qwen3-0.6B's decode GEMMs as one CUDA graph, with small row kernels (an RMSNorm) in
the places the model has its norms and attention kernels (nv's RMSNorm kernel):

    norm, qkv, 3 row kernels (rope/attention/reduce stand-ins), o_proj, norm, gate_up, down

Variants: PDL off; PDL on every kernel (with the plain-launch tile defaults, then with the
engine's PDL defaults); the best per-shape configuration from a PDL sweep (28 PDL launches of
one shape back to back, block_k up to the whole K slice so that all of a program's weights are
loaded before the wait; at 1 and 16 rows, unless --no-sweep) without PDL, with PDL on the GEMMs
only, and with PDL on every kernel. Outputs are checked against the PDL-off run with the same
configurations: they must be equal bit for bit.

    python benchmarks/pdl_sweep.py [--no-sweep] [rows ...]
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton

from nv_kernels.pdl import overlapped_launches
from nv_kernels.rms_norm import rms_norm_triton
from nv_kernels.skinny_gemm import SkinnyConfig, default_config, skinny_gemm

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gemm_sweep import DT, LAYERS, SHAPES, graph_us, layer_weights  # the same decode GEMMs

SWEEP_ROWS = (1, 16)  # row counts whose configurations are swept (the others run the defaults)


def row_norm(x: torch.Tensor, d: int, pdl: bool) -> torch.Tensor:
    """nv's RMSNorm of x's first d columns (unit weight), launched with PDL or not."""
    with overlapped_launches(pdl):
        return rms_norm_triton(x[:, :d], torch.ones(d, dtype=x.dtype, device=x.device), 1e-6)


def layers(x, weights, gemm_pdl, norm_pdl, cfgs):
    h = x
    for i in range(LAYERS):
        h = row_norm(h, 1024, norm_pdl)
        qkv = skinny_gemm(h, weights["qkv"][i], config=cfgs["qkv"], pdl=gemm_pdl)
        a = row_norm(qkv, 2048, norm_pdl)
        a = row_norm(a, 2048, norm_pdl)
        a = row_norm(a, 2048, norm_pdl)
        o = skinny_gemm(a, weights["o_proj"][i], config=cfgs["o_proj"], pdl=gemm_pdl)
        h2 = row_norm(o, 1024, norm_pdl)
        g = skinny_gemm(h2, weights["gate_up"][i], config=cfgs["gate_up"], gated=True, pdl=gemm_pdl)
        h = skinny_gemm(g, weights["down"][i], config=cfgs["down"], pdl=gemm_pdl)
    return h


def candidates(m: int, n: int, k: int, gated: bool):
    """Tiles whose weights fit in at most 64 (4 warps) or 128 (8 warps) registers a thread."""
    for bn, bk, split in itertools.product((16, 32, 64), (128, 256, 512, 1024), (1, 2, 4, 8)):
        if k % (bk * split) or bk * split > k:
            continue
        regs = bn * bk * (1 + gated) * 2 // 4 // 128  # per thread at 4 warps
        stages = 4 if k // (bk * split) > 2 else 2
        if regs <= 64:
            yield SkinnyConfig(bn, bk, split, 4, stages)
        elif regs <= 256:
            yield SkinnyConfig(bn, bk, split, 8, stages)


def main(rows: list[int], sweep_rows: tuple[int, ...] = SWEEP_ROWS) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    weights = layer_weights()
    table = []
    for m in rows:
        x = torch.randn(m, 1024, device="cuda", dtype=DT)
        dflt = {
            name: default_config(m, n // 2 if gated else n, k, sms)
            for name, (n, k, gated) in SHAPES.items()
        }
        # per-shape sweep with PDL: LAYERS launches of one shape back to back
        best = {}
        for name, (n, k, gated) in SHAPES.items():
            xs = torch.randn(m, k, device="cuda", dtype=DT)
            ws = weights[name]
            results = []
            swept = list(candidates(m, n, k, gated)) if m in sweep_rows else []
            for pdl, cfgs in ((False, [dflt[name]]), (True, [dflt[name], *swept])):
                for cfg in cfgs:
                    try:
                        ref = skinny_gemm(xs, ws[0], config=dflt[name], gated=gated)
                        out = skinny_gemm(xs, ws[0], config=cfg, gated=gated, pdl=pdl)
                        err = (out.float() - ref.float()).abs().max().item()
                        assert err <= 2e-2 * ref.float().abs().max().item() + 1e-2, err
                        t = graph_us(
                            lambda: [
                                skinny_gemm(xs, w, config=cfg, gated=gated, pdl=pdl) for w in ws
                            ]
                        )
                        results.append((t, pdl, cfg))
                    except Exception as e:
                        print(f"  M={m} {name} {cfg} pdl={pdl}: {type(e).__name__} {str(e)[:100]}")
            base = results[0][0]
            pdl_dflt = results[1][0] if len(results) > 1 else float("nan")
            results_pdl = sorted(r for r in results[1:])
            best[name] = results_pdl[0][2]
            print(
                f"M={m:3d} {name:7s} per launch: no PDL {base:5.2f} us | "
                f"PDL default {pdl_dflt:5.2f} "
                f"| PDL best {results_pdl[0][0]:5.2f} {tuple(results_pdl[0][2])}"
            )
            for t, _, cfg in results_pdl[1:4]:
                print(f"      next {t:5.2f} {tuple(cfg)}")

        engine = {  # what skinny_gemm picks inside overlapped_launches
            name: default_config(m, n // 2 if gated else n, k, sms, pdl=True, gated=gated)
            for name, (n, k, gated) in SHAPES.items()
        }
        variants = {
            "no PDL": (False, False, dflt),
            "PDL all": (True, True, dflt),
            "PDL all, engine cfg": (True, True, engine),
            "no PDL, best cfg": (False, False, best),
            "PDL GEMMs, best cfg": (True, False, best),
            "PDL all, best cfg": (True, True, best),
        }
        refs = {id(dflt): layers(x, weights, False, False, dflt)}
        refs[id(best)] = layers(x, weights, False, False, best)
        refs[id(engine)] = layers(x, weights, False, False, engine)
        row = [m]
        for vname, (gp, npdl, cfgs) in variants.items():
            out = layers(x, weights, gp, npdl, cfgs)
            same = torch.equal(out, refs[id(cfgs)])
            t = graph_us(lambda: layers(x, weights, gp, npdl, cfgs), launches=1)
            row.append(t)
            verdict = "equal to no PDL" if same else "DIFFERS from no PDL"
            print(f"M={m:3d} {vname:20s} {t:7.1f} us per 28 layers, {verdict}")
        table.append(row)
    print("\nrows | 28 layers (4 GEMMs + 6 row kernels each), us: " + " / ".join(variants))
    for r in table:
        print(f"{r[0]:4d} | " + " / ".join(f"{t:7.1f}" for t in r[1:]))


if __name__ == "__main__":
    print(torch.cuda.get_device_name(0), torch.__version__, triton.__version__)
    args = sys.argv[1:]
    main(
        [int(a) for a in args if a.isdigit()] or [1, 16, 64],
        () if "--no-sweep" in args else SWEEP_ROWS,
    )
