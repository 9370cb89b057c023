"""The fused sampler kernel on the GPU at batch 1..256 over a 151,936-token vocabulary, for
several `PROGRAMS_PER_SM` (how many chunks each row is cut into), greedy and temperature rows.
Per call, replayed in a CUDA graph.

    python benchmarks/sampler_sweep.py
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

import nv_kernels.sample_kernel as sk


def graph_us(fn) -> float:
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    return do_bench(g.replay, warmup=5, rep=40, return_mode="median") * 1e3 / 10


def main() -> None:
    v = 151936
    default = sk.PROGRAMS_PER_SM
    print(f"{'batch':>5} {'per SM':>6} {'chunks':>6} | greedy us | temp us")
    for b in (1, 8, 64, 128, 256):
        g = torch.Generator(device="cuda").manual_seed(b)
        logits = torch.randn(b, v, device="cuda", generator=g).bfloat16() * 4
        temps = torch.rand(b, device="cuda", generator=g) + 0.2
        seeds = torch.randint(0, 2**62, (b,), device="cuda", generator=g)
        steps = torch.randint(0, 4096, (b,), device="cuda", generator=g)
        want = sk.fused_sample(logits, temps, seeds, steps)
        for per_sm in (1, 2, 4, 8, 1000):
            sk.PROGRAMS_PER_SM = per_sm
            _, chunks = sk.split_vocab(b, v, 132)
            assert torch.equal(sk.fused_sample(logits), logits.float().argmax(-1))
            assert torch.equal(sk.fused_sample(logits, temps, seeds, steps), want)
            t_g = graph_us(lambda: sk.fused_sample(logits))
            t_t = graph_us(lambda: sk.fused_sample(logits, temps, seeds, steps))
            print(f"{b:5d} {per_sm:6d} {chunks:6d} | {t_g:9.1f} | {t_t:7.1f}")
        sk.PROGRAMS_PER_SM = default


if __name__ == "__main__":
    print(torch.cuda.get_device_name(0), torch.__version__)
    main()
