"""nv-kvcache bookkeeping cost (CPU only): one decode step of 256 running sequences, and
admitting 256 prompts of 1,000 tokens, at block sizes 16 and 256.

    python benchmarks/kvcache_bench.py
"""

from __future__ import annotations

import random
import statistics
import time

from nv_kvcache import BlockManager


def decode_step_us(block_size: int, num_seqs: int = 256, prompt_len: int = 1000) -> float:
    bm = BlockManager(num_blocks=num_seqs * (2048 // block_size + 2), block_size=block_size)
    rng = random.Random(0)
    tokens = {}  # the engine's token lists (the manager keeps none)
    for s in range(num_seqs):
        tokens[s] = [rng.randrange(50000) for _ in range(prompt_len)]
        bm.allocate(s, tokens[s], keep_tokens=False)
        bm.mark_computed(s, prompt_len, tokens[s])
    times = []
    for _ in range(300):  # 300 steps: crosses block boundaries for both sizes
        t = time.perf_counter()
        for s in range(num_seqs):
            bm.append_slots(s)
            tokens[s].append(7)
            bm.mark_computed(s, len(tokens[s]) - 1, tokens[s])
        times.append(time.perf_counter() - t)
    return statistics.mean(times) * 1e6


def admit_us(block_size: int, num_seqs: int = 256, prompt_len: int = 1000) -> float:
    rng = random.Random(1)
    prompts = [[rng.randrange(50000) for _ in range(prompt_len)] for _ in range(num_seqs)]
    runs = []
    for _ in range(5):
        bm = BlockManager(
            num_blocks=num_seqs * (prompt_len // block_size + 2), block_size=block_size
        )
        t = time.perf_counter()
        for s, p in enumerate(prompts):
            bm.allocate(s, p, keep_tokens=False)
            bm.mark_computed(s, prompt_len, p)
        runs.append(time.perf_counter() - t)
    return min(runs) * 1e6


if __name__ == "__main__":
    print("| block size | decode step, 256 seqs (µs) | admit 256 x 1,000-token prompts (µs) |")
    print("|---|---|---|")
    for bs in (16, 256):
        print(f"| {bs} | {decode_step_us(bs):.0f} | {admit_us(bs):.0f} |")
