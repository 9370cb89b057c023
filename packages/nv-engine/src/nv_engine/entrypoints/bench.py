"""Nano-vLLM's benchmark workload, exactly (256 requests, 133,966 output tokens by default)."""

from __future__ import annotations

import random
import time
from typing import Any

from nv_engine.sampling_params import SamplingParams

# The benchmarks' model: Qwen3-0.6B's shape, for random weights (`load_format="dummy"`).
QWEN3_0_6B_SHAPE: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
)


def nano_vllm_workload(
    num_seqs: int = 256,
    max_input_len: int = 1024,
    max_output_len: int = 1024,
    vocab_size: int = 10001,
) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompt lengths and tokens drawn first, then max_tokens, all from random.seed(0) (token
    ids below min(vocab_size, 10001); lengths from min(100, max) up to max)."""
    for name, value in (
        ("num_seqs", num_seqs),
        ("max_input_len", max_input_len),
        ("max_output_len", max_output_len),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    rng = random.Random(0)
    top = min(vocab_size, 10001) - 1
    prompts = [
        [rng.randint(0, top) for _ in range(rng.randint(min(100, max_input_len), max_input_len))]
        for _ in range(num_seqs)
    ]
    params = [
        SamplingParams(
            temperature=0.6,
            ignore_eos=True,
            max_tokens=rng.randint(min(100, max_output_len), max_output_len),
        )
        for _ in range(num_seqs)
    ]
    return prompts, params


def shared_prefix_workload(
    num_seqs: int = 256,
    prefix_len: int = 2048,
    own_len: int = 128,
    output_len: int = 128,
    vocab: int = 10001,
) -> tuple[list[list[int]], list[SamplingParams]]:
    """Workload P: one shared prefix plus each request's own tokens."""
    rng = random.Random(0)
    top = min(vocab, 10001) - 1
    prefix = [rng.randint(0, top) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randint(0, top) for _ in range(own_len)] for _ in range(num_seqs)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=output_len)
        for _ in range(num_seqs)
    ]
    return prompts, params


def run_benchmark(
    llm: Any, prompts: list[list[int]], params: list[SamplingParams]
) -> dict[str, float]:
    # Warm up: a batch of several prompts, sampled like the workload (temperature only).
    vocab = llm.config.hf_config.vocab_size
    warm = [[t % vocab for t in r] for r in (range(1, 5), range(5, 40), range(40, 300))]
    llm.generate(warm, SamplingParams(temperature=0.6, max_tokens=8), use_tqdm=False)
    t = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    tokens = sum(len(o["token_ids"]) for o in outputs)
    return {"output_tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}
