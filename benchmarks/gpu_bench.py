"""GPU benchmarks for docs/benchmarks.md, in one process so one device call covers them all.

    python benchmarks/gpu_bench.py [sections...]   # default: all
sections: env bandwidth kernels a a-pdl-all a-pdl-skinny128 a16 a-mix a-fp8 a-fp8-e5m2
          fp8-accuracy batch1 batch1-nopdl p mix trace kprofile kprofile-fp8 kprofile-fp8-e5m2 hf
Prints one JSON line per result and a summary table last.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from nv_engine.entrypoints.bench import QWEN3_0_6B_SHAPE

RESULTS: list[dict] = []
QWEN3_06B = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    **QWEN3_0_6B_SHAPE,
    torch_dtype="bfloat16",
    hidden_act="silu",
    attention_bias=False,
    bos_token_id=151643,
    eos_token_id=151645,
)


def report(name: str, **values) -> None:
    row = {"name": name, **values}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def model_dir(cfg: dict) -> str:
    d = tempfile.mkdtemp(prefix="nv-model-")
    (Path(d) / "config.json").write_text(json.dumps(cfg))
    return d


def make_llm(cfg: dict = QWEN3_06B, **kw):
    from nv_engine import LLM

    kw.setdefault("load_format", "dummy")
    return LLM(model_dir(cfg), **kw)


def env() -> None:
    import transformers
    import triton

    p = torch.cuda.get_device_properties(0)
    report(
        "env",
        gpu=p.name,
        sms=p.multi_processor_count,
        mem_gib=round(p.total_memory / 2**30),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        transformers=transformers.__version__,
        python=sys.version.split()[0],
    )


def bandwidth() -> float:
    n = 2 << 30  # 2 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    times.sort()
    bw = 2 * n / times[len(times) // 2]
    report("copy_bandwidth", tb_per_s=round(bw / 1e12, 3))
    del a, b
    torch.cuda.empty_cache()
    return bw


def kv_bytes_per_token(cfg: dict, itemsize: int = 2) -> int:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * itemsize


def weight_bytes(cfg: dict, itemsize: int = 2) -> int:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * i + 2 * h + 2 * d
    emb = v * h * (1 if cfg["tie_word_embeddings"] else 2)
    return (cfg["num_hidden_layers"] * per_layer + emb + h) * itemsize


def floor_seconds(cfg, prompts, params, bw, kv_itemsize: int = 2) -> float:
    """Weights once per decode step (as many steps as the longest output), every cached token's
    K/V read once per decoded token, K/V written once (`kv_itemsize`: 1 for an fp8 cache)."""
    kv = kv_bytes_per_token(cfg, kv_itemsize)
    steps = max(p.max_tokens for p in params)
    read = sum(
        kv * sum(len(pr) + t for t in range(p.max_tokens))
        for pr, p in zip(prompts, params, strict=True)
    )
    write = sum(kv * (len(pr) + p.max_tokens) for pr, p in zip(prompts, params, strict=True))
    return (steps * weight_bytes(cfg) + read + write) / bw


def kernels(bw: float) -> None:
    from triton.testing import do_bench

    from nv_kernels import AttentionMetadata
    from nv_kernels.triton_attention import decode_attention, prefill_attention

    for batch, ctx, bs in [(256, 1024, 256), (256, 1024, 16), (1, 4096, 256), (32, 8192, 16)]:
        hkv, h, d = 8, 16, 128
        blocks_per = -(-ctx // bs)
        nb = batch * blocks_per + 1
        kc = torch.randn(nb, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nb - 1, device="cuda")[: batch * blocks_per].view(batch, blocks_per)
        meta = AttentionMetadata(
            False,
            torch.zeros(batch, dtype=torch.int64, device="cuda"),
            torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
            bt.to(torch.int32),
        )
        q = torch.randn(batch, h, d, device="cuda", dtype=torch.bfloat16)
        ms = do_bench(lambda: decode_attention(q, kc, vc, meta, d**-0.5), return_mode="median")
        nbytes = 2 * batch * ctx * hkv * d * 2
        report(
            "decode_attention",
            batch=batch,
            context=ctx,
            block_size=bs,
            us=round(ms * 1e3, 1),
            tb_per_s=round(nbytes / ms / 1e9, 3),
            frac_copy_bw=round(nbytes / ms * 1e3 / bw, 3),
        )
    for n_seqs, L in [(4, 2048), (16, 1024)]:
        h, hkv, d = 16, 8, 128
        tot = n_seqs * L
        q = torch.randn(tot, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(tot, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu = torch.arange(0, tot + 1, L, dtype=torch.int32, device="cuda")
        meta = AttentionMetadata(
            True, torch.full((tot,), -1, device="cuda"), None, None, cu, cu, L, L
        )
        empty = torch.empty(0, device="cuda")
        ms = do_bench(
            lambda: prefill_attention(q, k, v, empty, empty, meta, d**-0.5), return_mode="median"
        )
        flops = 4 * n_seqs * L * L * h * d / 2  # causal
        report(
            "prefill_attention",
            seqs=n_seqs,
            len=L,
            us=round(ms * 1e3, 1),
            tflops=round(flops / ms / 1e9, 1),
        )


@contextlib.contextmanager
def compile_log():
    """Print every Triton compilation (kernel, seconds) and torch.compile recompilation while
    inside: work a timed run should not do."""
    from triton.runtime.jit import JITFunction

    orig = getattr(JITFunction, "_do_compile", None)

    def logged(self, *args, **kwargs):
        t = time.perf_counter()
        out = orig(self, *args, **kwargs)
        print(f"[compile] triton {self.__name__} {time.perf_counter() - t:.2f}s", flush=True)
        return out

    if orig is not None:
        JITFunction._do_compile = logged
    torch._logging.set_logs(recompiles=True)
    try:
        yield
    finally:
        torch._logging.set_logs(recompiles=False)
        if orig is not None:
            JITFunction._do_compile = orig


@contextlib.contextmanager
def skinny_rows(rows: int | None):
    """The skinny GEMM up to `rows` rows (None: the engine's DISPATCH_ROWS), for experiments."""
    import importlib

    skinny_gemm = importlib.import_module("nv_kernels.skinny_gemm")  # the module, not the function

    saved = skinny_gemm.DISPATCH_ROWS
    if rows is not None:
        skinny_gemm.DISPATCH_ROWS = rows
    try:
        yield
    finally:
        skinny_gemm.DISPATCH_ROWS = saved


def workload_a(
    bw: float, block_size: int = 256, tag: str = "A", skinny: int | None = None, **config
) -> None:
    from nv_engine.entrypoints.bench import nano_vllm_workload, run_benchmark

    prompts, params = nano_vllm_workload()
    with (
        skinny_rows(skinny),
        make_llm(kvcache_block_size=block_size, **config) as llm,
        compile_log(),
    ):
        r = run_benchmark(llm, prompts, params)
    fp8 = config.get("kv_cache_dtype", "auto") != "auto"
    fl = floor_seconds(QWEN3_06B, prompts, params, bw, kv_itemsize=1 if fp8 else 2)
    report(
        f"workload_{tag}",
        block_size=block_size,
        **{k: round(v, 2) for k, v in r.items()},
        floor_s=round(fl, 3),
        floor_tok_per_s=round(r["output_tokens"] / fl),
        frac_of_floor=round(fl / r["seconds"], 3),
    )


def fp8_accuracy() -> None:
    """Logits with an fp8 KV cache (e4m3, then e5m2) against a bf16 one, 0.6B shape, random
    weights: every position of a 1,001-token prompt prefilled in 64-token chunks (each chunk
    reads the earlier ones back from the cache), through prompt logprobs; max and mean abs
    error, mean KL and greedy agreement over the 1,000 positions."""
    from nv_engine import SamplingParams

    prompt = torch.randint(0, 151936, (1001,), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kv in ("auto", "fp8", "fp8_e5m2"):
        rows: list[torch.Tensor] = []
        with make_llm(kv_cache_dtype=kv, max_num_batched_tokens=64, kvcache_block_size=16) as llm:
            model = llm.model_runner.model
            compute_logits = model.compute_logits

            def recording(
                hidden, indices=None, gather=True, compute_logits=compute_logits, rows=rows
            ):
                out = compute_logits(hidden, indices, gather)
                if out.shape[0] > 1:  # the prompt-logprobs chunks
                    rows.append(out.float())
                return out

            model.compute_logits = recording
            p = SamplingParams(max_tokens=1, prompt_logprobs=1)
            llm.generate([prompt.tolist()], p, use_tqdm=False)
        logits[kv] = torch.cat(rows)
    ref = logits["auto"]
    for kv in ("fp8", "fp8_e5m2"):
        fp8 = logits[kv]
        err = (fp8 - ref).abs()
        kl = torch.nn.functional.kl_div(
            fp8.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        report(
            "fp8_kv_accuracy",
            kv_cache_dtype=kv,
            positions=ref.shape[0],
            max_abs=round(err.max().item(), 4),
            mean_abs=round(err.mean().item(), 5),
            logits_std=round(ref.std().item(), 4),
            mean_kl=float(f"{kl.mean().item():.3e}"),
            greedy_agreement=round((fp8.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
        )


def batch1(bw: float, pdl: bool = True) -> None:
    from nv_engine import SamplingParams

    with make_llm(kvcache_block_size=256, **({} if pdl else {"pdl_max_batch_size": 0})) as llm:
        prompt = list(range(1000, 1128))
        p = SamplingParams(temperature=0.0, max_tokens=1024, ignore_eos=True)
        llm.generate([prompt], SamplingParams(max_tokens=8), use_tqdm=False)
        llm.add_request(prompt, p)
        llm.step()  # prefill + first token
        ms, steps = ms_per_step_to_end(llm)
    floor_ms = weight_bytes(QWEN3_06B) / bw * 1e3
    report(
        "batch1_decode" if pdl else "batch1_decode_no_pdl",
        ms_per_token=round(ms, 3),
        weight_floor_ms=round(floor_ms, 3),
        steps=steps,
    )


def workload_p() -> None:
    from nv_engine.entrypoints.bench import run_benchmark, shared_prefix_workload

    prompts, params = shared_prefix_workload()
    # cascade attention (decode steps attend to the shared prefix once for the rows sharing
    # it) is on by default (shared_prefix_min_tokens=1024); 0 turns it off
    for caching, cascade in ((True, True), (True, False), (False, False)):
        bs = 256
        opt = dict(shared_prefix_min_tokens=1024 if cascade else 0)
        with make_llm(kvcache_block_size=bs, enable_prefix_caching=caching, **opt) as llm:
            r = run_benchmark(llm, prompts, params)
            hit = llm.scheduler.block_manager.stats().hit_rate
        report(
            "workload_P",
            prefix_caching=caching,
            cascade=cascade,
            block_size=bs,
            hit_rate=round(hit, 3),
            **{k: round(v, 2) for k, v in r.items()},
        )


def start_decoding(llm, num_seqs: int, prompt_len: int, max_tokens: int) -> None:
    """Admit `num_seqs` sampled requests and run steps until every prompt is prefilled."""
    from nv_engine import SamplingParams

    p = SamplingParams(temperature=0.6, max_tokens=max_tokens, ignore_eos=True)
    for i in range(num_seqs):
        llm.add_request(list(range(i, i + prompt_len)), p)
    while llm.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prefill_tokens for s in llm.scheduler.running
    ):
        llm.step()


def mix() -> None:
    """64 requests decoding when one 16,000-token prompt arrives, with mixed decode+prefill steps
    off and on: every step's wall time from the prompt's arrival until its first token, and each
    decoding request's longest gap between two tokens in that window."""
    from nv_engine import SamplingParams

    for on in (False, True):
        with make_llm(
            mix_decode_and_prefill=on, max_model_len=20000, kvcache_block_size=256
        ) as llm:
            start_decoding(llm, 64, 500, 600)
            decode_ms = ms_per_step(llm, 5, 20)
            gaps: dict[int, float] = {}
            long_id = llm.add_request(
                list(range(16000)), SamplingParams(temperature=0.6, max_tokens=4)
            )
            steps: list[tuple[float, str, int]] = []
            torch.cuda.synchronize()
            t_prev = time.perf_counter()
            last = {s.seq_id: t_prev for s in llm.scheduler.running}
            ttft = first_token_step = None
            decoders = set(last)

            def window_open() -> bool:  # until the prompt's first token, and every decoder's
                # next one after it (a gap spanning the prefill must be closed to be measured)
                return ttft is None or any(last[r] <= ttft for r in decoders)

            while window_open() and len(steps) < 50:
                outs = llm.step()
                now = time.perf_counter()
                was_prefill, n = llm.last_step
                steps.append((round((now - t_prev) * 1e3, 2), "P" if was_prefill else "D", n))
                t_prev = now
                for o in outs:
                    if o.request_id == long_id:
                        if ttft is None:
                            ttft, first_token_step = now, len(steps)
                        continue
                    rid = o.request_id
                    if rid in last:
                        gaps[rid] = max(gaps.get(rid, 0), now - last[rid])
                    last[rid] = now
            report(
                "mix_64_decoding_plus_16k_prompt",
                mix_decode_and_prefill=on,
                decode_step_ms=round(decode_ms, 2),
                max_gap_ms=round(max(gaps.values()) * 1e3, 2),
                max_step_ms=max(t for t, _, _ in steps),
                steps_to_first_token=first_token_step if ttft is not None else None,
                steps_ms_kind_tokens=steps,
            )


def ms_per_step_to_end(llm) -> tuple[float, int]:
    """Wall milliseconds per `llm.step()` from now until every request has finished, and the
    number of steps."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    steps = 0
    while not llm.is_finished():
        llm.step()
        steps += 1
    return (time.perf_counter() - t) / steps * 1e3, steps


def ms_per_step(llm, warmup: int, steps: int) -> float:
    """Wall milliseconds per `llm.step()` over `steps` steps, after `warmup` untimed ones."""
    for _ in range(warmup):
        llm.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        llm.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def _kernel_table(prof, steps: int, top: int = 22) -> float:
    """Print the top GPU kernels of a profiled window (µs per step); return GPU µs per step."""
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in rows) / steps
    for e in rows[:top]:
        print(f"  {e.device_time_total / steps:9.1f} us/step {e.count // steps:5d}x  {e.key[:90]}")
    print(f"  {total:9.1f} us/step GPU busy in all")
    return total


def trace() -> None:
    """Workload A step by step: wall time per step by batch size, and GPU kernel time from
    torch.profiler windows at a few batch sizes (what is GPU, what is host)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from nv_engine import SamplingParams
    from nv_engine.entrypoints.bench import nano_vllm_workload

    prompts, params = nano_vllm_workload()
    with make_llm(kvcache_block_size=256) as llm:
        llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4), use_tqdm=False)
        for p, sp in zip(prompts, params, strict=True):
            llm.add_request(p, sp)
        windows = {256: None, 128: None, 32: None, 4: None}
        buckets: dict[str, list[float]] = {}
        t_all = time.perf_counter()
        while not llm.is_finished():
            n = len(llm.scheduler.running)
            w = next((b for b, v in windows.items() if v is None and n <= b), None)
            decoding = not llm.scheduler.waiting and n > 0
            if decoding and w is not None and n > w // 2:
                torch.cuda.synchronize()
                t = time.perf_counter()
                with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        llm.step()
                    torch.cuda.synchronize()
                wall = (time.perf_counter() - t) / 5 * 1e3
                print(f"profile window: {n} running, wall {wall:.2f} ms/step (profiled)")
                windows[w] = _kernel_table(prof, 5)
                continue
            t = time.perf_counter()
            llm.step()
            dt = time.perf_counter() - t
            was_prefill, _ = llm.last_step
            key = "prefill" if was_prefill else f"decode {1 << (n.bit_length() - 1):>3}+"
            buckets.setdefault(key, []).append(dt)
        total = time.perf_counter() - t_all
        for key in sorted(buckets):
            xs = buckets[key]
            report(
                "trace_A",
                bucket=key,
                steps=len(xs),
                ms_per_step=round(sum(xs) / len(xs) * 1e3, 3),
                seconds=round(sum(xs), 3),
            )
        report("trace_A_total", seconds=round(total, 2), gpu_us_per_step=windows)


def kprofile(**config) -> None:
    """GPU kernels of a 16k-token prefill step, the batch-1 decode step and a 256-sequence
    decode step (engine settings `config`, e.g. an fp8 KV cache)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from nv_engine import SamplingParams

    with make_llm(kvcache_block_size=256, **config) as llm:
        p = SamplingParams(max_tokens=1)
        # round 0 warms up, round 1 is profiled, round 2 timed without the profiler (its
        # per-launch overhead inflates wall time); distinct tokens: no prefix hits
        for rnd in range(3):
            for i in range(29):
                llm.add_request([(rnd * 29 + i) * 7 % 150000 + j for j in range(560)], p)
            torch.cuda.synchronize()
            t = time.perf_counter()
            with tprofile(activities=[ProfilerActivity.CUDA]) if rnd == 1 else nullcontext() as pr:
                llm.step()
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t) * 1e3
            if rnd == 1:
                prof, wall_profiled = pr, wall
            while not llm.is_finished():
                llm.step()
        print(f"prefill 29 x 560 tokens: wall {wall:.2f} ms ({wall_profiled:.2f} profiled)")
        gpu = _kernel_table(prof, 1, top=16)
        report(
            "kprofile_prefill", tokens=29 * 560, wall_ms=round(wall, 2), gpu_ms=round(gpu / 1e3, 2)
        )

    for n in (1, 256):
        with make_llm(kvcache_block_size=256, **config) as llm:
            wall, gpu = profile_decode(llm, n, 500 if n > 1 else 128, f"batch {n}")
            report(
                "kprofile", **config, batch=n, wall_ms=round(wall, 3), gpu_ms=round(gpu / 1e3, 3)
            )


def profile_decode(llm, num_seqs: int, prompt_len: int, label: str) -> tuple[float, float]:
    """`num_seqs` requests decoding: wall ms per step, then this process's GPU kernels over 10
    profiled steps (printed); returns (wall ms, GPU µs) per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    start_decoding(llm, num_seqs, prompt_len, max_tokens=200)
    wall = ms_per_step(llm, warmup=5, steps=20)
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            llm.step()
        torch.cuda.synchronize()
    print(f"{label}: wall {wall:.3f} ms/step")
    return wall, _kernel_table(prof, 10, top=30)


def hf_baseline() -> None:
    """transformers on the same card, on a slice of workload A: static-batch `generate`, then
    continuous batching (`generate_batch`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nv_engine.entrypoints.bench import nano_vllm_workload

    cfg = AutoConfig.for_model(**{k: v for k, v in QWEN3_06B.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).cuda().eval()
    prompts, _ = nano_vllm_workload(64)
    n_out = 256
    batch = [p[:512] for p in prompts]
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n_out,
            min_new_tokens=n_out,
            do_sample=True,
            temperature=0.6,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        s = time.perf_counter() - t
    report(
        "hf_static_generate",
        requests=len(batch),
        out_tokens=len(batch) * n_out,
        seconds=round(s, 2),
        tok_per_s=round(len(batch) * n_out / s),
    )
    hf_generate_batch(model, batch, n_out)


def hf_generate_batch(model, prompts: list[list[int]], n_out: int) -> None:
    """transformers' continuous batching (`generate_batch`, paged attention) on the same
    requests as the static-batch baseline."""
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=n_out, do_sample=True, temperature=0.6, eos_token_id=None, pad_token_id=0
    )
    try:
        with torch.no_grad():
            model.generate_batch(inputs=prompts[:2], generation_config=gen)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate_batch(inputs=prompts, generation_config=gen)
            torch.cuda.synchronize()
            s = time.perf_counter() - t
    except Exception as e:  # an API that moved between transformers versions: say so, go on
        report("hf_generate_batch", error=f"{type(e).__name__}: {str(e)[:200]}")
        return
    tokens = sum(len(o.generated_tokens) for o in out.values())
    report(
        "hf_generate_batch",
        requests=len(prompts),
        out_tokens=tokens,
        seconds=round(s, 2),
        tok_per_s=round(tokens / s),
    )


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sections = sys.argv[1:] or [
        "env",
        "bandwidth",
        "kernels",
        "a",
        "a16",
        "batch1",
        "p",
        "hf",
    ]
    bw = None  # measured by the `bandwidth` section, or on first need: floors use this card's own
    for s in sections:
        if bw is None and (s.startswith("a") or s in ("kernels", "batch1", "batch1-nopdl")):
            bw = bandwidth()
        t = time.perf_counter()
        try:
            if s == "env":
                env()
            elif s == "bandwidth":
                bw = bw or bandwidth()
            elif s == "kernels":
                kernels(bw)
            elif s == "a":
                workload_a(bw, 256)
            elif s == "a-pdl-all":  # PDL in every decode graph (GEMMs above 64 rows: cuBLAS)
                workload_a(bw, 256, "A_pdl_all", pdl_max_batch_size=1 << 30)
            elif s == "a-pdl-skinny128":  # PDL and the skinny GEMM up to 128 rows
                workload_a(bw, 256, "A_pdl_skinny128", skinny=128, pdl_max_batch_size=128)
            elif s == "a16":
                workload_a(bw, 16, "A_block16")
            elif s == "batch1":
                batch1(bw)
            elif s == "batch1-nopdl":  # the decode graphs with plain launches
                batch1(bw, pdl=False)
            elif s == "p":
                workload_p()
            elif s == "mix":
                mix()
            elif s == "a-fp8":  # workload A with an fp8 KV cache
                workload_a(bw, 256, "A_fp8", kv_cache_dtype="fp8")
            elif s == "a-fp8-e5m2":  # the same in e5m2 (vLLM's fp8_e5m2)
                workload_a(bw, 256, "A_fp8_e5m2", kv_cache_dtype="fp8_e5m2")
            elif s == "fp8-accuracy":
                fp8_accuracy()
            elif s == "a-mix":  # workload A with mixed decode+prefill steps
                workload_a(bw, 256, "A_mix", mix_decode_and_prefill=True)
            elif s == "trace":
                trace()
            elif s == "kprofile":
                kprofile()
            elif s == "kprofile-fp8":
                kprofile(kv_cache_dtype="fp8")
            elif s == "kprofile-fp8-e5m2":
                kprofile(kv_cache_dtype="fp8_e5m2")
            elif s == "hf":
                hf_baseline()
        except Exception as e:  # keep going: one failing section must not hide the rest
            report(f"{s}_FAILED", error=repr(e)[:500])
        print(f"# section {s}: {time.perf_counter() - t:.1f}s", flush=True)
    print("\n==== summary ====")
    for row in RESULTS:
        print(" ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
