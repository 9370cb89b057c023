"""Where the host time of a 16k-token prefill step goes (Qwen3-0.6B shape, random bf16): the
step's wall time against its GPU time, then the CPU ops with the most self time and the top
Python frames (cProfile) of one step.

    python benchmarks/prefill_cpu.py
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import gpu_bench

from nv_engine import SamplingParams


def main() -> None:
    with gpu_bench.make_llm(kvcache_block_size=256) as llm:
        p = SamplingParams(max_tokens=1)
        for rnd in range(4):
            for i in range(29):
                llm.add_request([(rnd * 29 + i) * 7 % 150000 + j for j in range(560)], p)
            torch.cuda.synchronize()
            prof = cProfile.Profile() if rnd == 3 else None
            t = time.perf_counter()
            if prof:
                prof.enable()
            llm.step()
            t_launch = time.perf_counter() - t
            torch.cuda.synchronize()
            if prof:
                prof.disable()
            wall = time.perf_counter() - t
            print(f"round {rnd}: step {wall * 1e3:.2f} ms (returned after {t_launch * 1e3:.2f})")
            while not llm.is_finished():
                llm.step()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
