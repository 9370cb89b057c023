"""Workload A under a few engine settings, one engine after another in one process.

python benchmarks/a_variants.py
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import gpu_bench

from nv_engine.entrypoints.bench import nano_vllm_workload, run_benchmark

VARIANTS = {
    "default": {},
    "graphs every 8 rows": {"cuda_graph_batch_sizes": (1, 2, 4, *range(8, 513, 8))},
    "max_num_batched_tokens 32768": {"max_num_batched_tokens": 32768},
    "default again": {},
}

if __name__ == "__main__":
    prompts, params = nano_vllm_workload()
    for name, kw in VARIANTS.items():
        with gpu_bench.make_llm(kvcache_block_size=256, **kw) as llm:
            r = run_benchmark(llm, prompts, params)
        print(f"{name:32s} {r['seconds']:.3f} s  {r['tok_per_s']:,.0f} tok/s", flush=True)
