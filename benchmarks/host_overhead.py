"""Host-side work of one decode step at 256 running sequences, without the forward pass:
scheduling, input staging, sampling-parameter staging, post-processing. Runs on CPU with a tiny
random model (the host code is the same on a GPU machine).

    python benchmarks/host_overhead.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from gpu_bench import start_decoding
from transformers import Qwen3Config

from nv_engine import LLM


def main(num_seqs: int = 256, steps: int = 200) -> None:
    d = tempfile.mkdtemp()
    cfg = Qwen3Config(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        architectures=["Qwen3ForCausalLM"],
    )
    (Path(d) / "config.json").write_text(json.dumps(cfg.to_dict()))
    with LLM(
        d,
        device="cpu",
        load_format="dummy",
        kvcache_block_size=256,
        num_kvcache_blocks=num_seqs * 8,
        async_scheduling=False,
    ) as llm:
        start_decoding(llm, num_seqs, 500, max_tokens=10_000)
        runner, sched = llm.model_runner, llm.scheduler
        # postprocess: the scheduler's and the output stage's (stop checks; no detokenization
        # for requests that neither stream nor have stop strings)
        t = {"schedule": [], "stage_inputs_and_sampling": [], "postprocess": []}
        fake = torch.zeros(num_seqs, dtype=torch.int64)
        for _ in range(steps):
            t0 = time.perf_counter()
            plan = sched.schedule()
            t1 = time.perf_counter()
            runner._prepare_decode(plan, len(plan.seqs), list(plan.seqs))
            t2 = time.perf_counter()
            llm.output_processor.process(sched.postprocess(plan, (fake + 7).tolist()))
            t3 = time.perf_counter()
            for k, a, b in (
                ("schedule", t0, t1),
                ("stage_inputs_and_sampling", t1, t2),
                ("postprocess", t2, t3),
            ):
                t[k].append(b - a)
    med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    print(
        " | ".join(f"{k} {v:.3f} ms" for k, v in med.items()), f"| total {sum(med.values()):.3f} ms"
    )


if __name__ == "__main__":
    main()
