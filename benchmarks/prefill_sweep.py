"""Sweep the prefill attention kernel's launch configuration (tile sizes, warps, stages) on the
shapes prefill meets: workload A's prompts, one 16k-token prompt, and chunks over a long cached
prefix (workload P, bf16 and fp8 caches). Each config is checked against the default one.

    python benchmarks/prefill_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.testing import do_bench

from nv_kernels import AttentionMetadata
from nv_kernels.triton_attention import prefill_attention

H, HKV, D = 16, 8, 128


def fresh_case(lens: list[int]):
    """Prompts with nothing cached: causal attention over this step's own k and v."""
    tot = sum(lens)
    q = torch.randn(tot, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(tot, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(
        True, torch.full((tot,), -1, device="cuda"), None, None, cu, cu, max(lens), max(lens)
    )
    empty = torch.empty(0, device="cuda")
    flops = sum(4 * n * n * H * D / 2 for n in lens)
    return (q, k, v, empty, empty, meta), flops


def paged_case(seqs: int, new: int, cached: int, kv_dtype: torch.dtype, block_size: int = 256):
    """`new` tokens per sequence over `cached` earlier ones, read through block tables."""
    ctx = cached + new
    per = -(-ctx // block_size)
    blocks = seqs * per + 1
    kc = torch.randn(blocks, block_size, HKV, D, device="cuda").to(kv_dtype)
    vc = torch.randn_like(kc, dtype=torch.float32).to(kv_dtype)
    bt = (torch.randperm(blocks - 1, device="cuda")[: seqs * per] + 1).view(seqs, per)
    q = torch.randn(seqs * new, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(seqs * new, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu_q = torch.arange(0, seqs * new + 1, new, dtype=torch.int32, device="cuda")
    cu_k = torch.arange(0, seqs * ctx + 1, ctx, dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(
        True,
        torch.full((seqs * new,), -1, device="cuda"),
        None,
        bt.to(torch.int32),
        cu_q,
        cu_k,
        new,
        ctx,
    )
    flops = seqs * 4 * new * (cached + new / 2) * H * D
    return (q, k, v, kc, vc, meta), flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    quick = ap.parse_args().quick
    cases = {
        "A prompts 29 x 560": fresh_case([560] * 29),
        "one 16k prompt": fresh_case([16000]),
        "P 64 x 128 over 2k, bf16": paged_case(64, 128, 2000, torch.bfloat16),
        "P 64 x 128 over 2k, fp8": paged_case(64, 128, 2000, torch.float8_e4m3fn),
    }
    grid = itertools.product(
        (64, 128), (32, 64) if quick else (32, 64, 128), (4, 8), (2, 3) if quick else (2, 3, 4)
    )
    configs = [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in grid]
    for name, (args, flops) in cases.items():
        ref = prefill_attention(*args, D**-0.5).float()
        best = None
        for cfg in configs:
            try:
                out = prefill_attention(*args, D**-0.5, **cfg).float()
                ms = do_bench(lambda: prefill_attention(*args, D**-0.5, **cfg), rep=50)
            except Exception as e:  # e.g. out of shared memory
                print(f"skip {cfg}: {type(e).__name__}")
                continue
            err = ((out - ref).norm() / ref.norm()).item()
            row = dict(case=name, **cfg, us=round(ms * 1e3, 1), tflops=round(flops / ms / 1e9, 1))
            row["err"] = round(err, 5)
            print(json.dumps(row), flush=True)
            if err < 1e-2 and (best is None or ms * 1e3 < best["us"]):
                best = row
        print("BEST", json.dumps(best), flush=True)


if __name__ == "__main__":
    main()
