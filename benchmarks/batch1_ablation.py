"""Batch-1 decode with each fused piece switched off in turn (monkeypatched before the engine
captures its graphs), plus the kernel table of the default engine.

    python benchmarks/batch1_ablation.py
"""

from __future__ import annotations

import contextlib
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import gpu_bench

import nv_models.qwen3 as qwen3_mod
from nv_engine import SamplingParams
from nv_kernels import sampler as sampler_mod


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def run(label: str, profile: bool = False, temperature: float = 0.0) -> None:
    with gpu_bench.make_llm(kvcache_block_size=256) as llm:
        prompt = list(range(1000, 1128))
        llm.generate([prompt], SamplingParams(max_tokens=8), use_tqdm=False)
        p = SamplingParams(temperature=temperature, max_tokens=400, ignore_eos=True)
        llm.add_request(prompt, p)
        ms = gpu_bench.ms_per_step(llm, warmup=20, steps=200)
        print(f"{label:40s} {ms:.3f} ms/step", flush=True)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as tprofile

            with tprofile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    llm.step()
                torch.cuda.synchronize()
            gpu_bench._kernel_table(prof, 10, top=25)
            rows = [e for e in prof.key_averages() if e.device_type.name == "CPU"]
            rows.sort(key=lambda e: e.cpu_time_total, reverse=True)
            for e in rows[:12]:
                print(
                    f"  cpu {e.cpu_time_total / 10:9.1f} us/step {e.count // 10:5d}x {e.key[:70]}"
                )


def main() -> None:
    run("default (greedy)", profile=True)
    run("default (temperature 0.6)", temperature=0.6)
    with patched(qwen3_mod, "use_qk_norm_rope_store", lambda *a: False):
        run("no fused rope+store")
    with patched(sampler_mod, "fused_sample", lambda logits, *a: logits.argmax(-1)):
        run("greedy sampler = torch argmax")


if __name__ == "__main__":
    main()
