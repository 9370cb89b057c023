"""Where a batch-1 decode step's wall time goes on the host, greedy against sampled rows.

Times each part of `LLM.step()` (schedule, launch = input staging + graph replay + sampler,
the wait for the previous step's tokens, postprocess) over 500 steps of one 128-token-prompt
request on a Qwen3-0.6B-shaped model. With overlapped scheduling the step is host-bound when
the wait is near zero.

    python benchmarks/batch1_host.py
"""

from __future__ import annotations

import statistics
import time

from gpu_bench import QWEN3_06B, make_llm, ms_per_step_to_end

from nv_engine import SamplingParams
from nv_engine.worker import staging as staging_mod


def timed(obj, name: str, log: list[float]):
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            log.append(time.perf_counter() - t)

    setattr(obj, name, wrapper)


def main() -> None:
    rows = []
    with make_llm(QWEN3_06B, kvcache_block_size=256) as llm:
        for temp in (0.0, 0.6, 0.0, 0.6):
            logs = {k: [] for k in ("schedule", "launch", "wait", "postprocess")}
            timed(llm.scheduler, "schedule", logs["schedule"])
            timed(llm.model_runner, "launch", logs["launch"])
            timed(llm.scheduler, "postprocess", logs["postprocess"])
            tolist = staging_mod.SampledTokens.tolist

            def waited(self, _orig=tolist, _log=logs["wait"]):
                t = time.perf_counter()
                out = _orig(self)
                _log.append(time.perf_counter() - t)
                return out

            staging_mod.SampledTokens.tolist = waited
            p = SamplingParams(temperature=temp, max_tokens=560, ignore_eos=True)
            llm.add_request(list(range(1000, 1128)), p)
            for _ in range(50):
                llm.step()
            for v in logs.values():
                v.clear()
            wall, _ = ms_per_step_to_end(llm)
            staging_mod.SampledTokens.tolist = tolist
            for name in ("schedule", "launch", "postprocess"):
                delattr(llm.scheduler if name != "launch" else llm.model_runner, name)
            med = {k: statistics.median(v) * 1e3 for k, v in logs.items()}
            rows.append((temp, wall, med))
    print("temperature | wall ms/step | median ms: schedule / launch / wait / postprocess")
    for temp, wall, med in rows:
        parts = " / ".join(f"{med[k]:.3f}" for k in ("schedule", "launch", "wait", "postprocess"))
        print(f"{temp:11.1f} | {wall:12.3f} | {parts}")


if __name__ == "__main__":
    main()
