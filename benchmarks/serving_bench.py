"""Serving benchmark: `nv-engine serve` in its own process, clients streaming over HTTP.

    python benchmarks/serving_bench.py [--rates 4 16 64] [--model DIR] [--duration 15]

Requests arrive as a Poisson process at each rate, with workload A's length distributions
(prompt 100-1,024 tokens, output 100-1,024 tokens, temperature 0.6, ignore_eos, prompts sent
as token ids). Each client streams its completion (`stream: true`) and timestamps every SSE
chunk: time to first token (TTFT), the gaps between chunks (inter-token latency, ITL; one chunk
is one token here) and end-to-end latency (E2E), as p50/p90/p99, plus output tokens per second
over the whole run. Clients run in several processes so that the client side is not the
bottleneck. Without --model it serves random bf16 weights of Qwen3-0.6B's shape with a
word-level tokenizer over the whole vocabulary (every token decodes to text).
Prints one JSON line per rate and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MODEL = ""  # the served model's directory


def bench_model_dir() -> str:
    """Qwen3-0.6B's shape (random weights via --load-format dummy) and a word-level tokenizer
    with a word for every id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nv_engine.entrypoints.bench import QWEN3_0_6B_SHAPE

    d = Path(tempfile.mkdtemp(prefix="nv-serving-model-"))
    cfg = dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        **QWEN3_0_6B_SHAPE,
        torch_dtype="bfloat16",
        hidden_act="silu",
        bos_token_id=151643,
        eos_token_id=151645,
    )
    (d / "config.json").write_text(json.dumps(cfg))
    vocab = {f"w{i}": i for i in range(cfg["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w151645").save_pretrained(d)
    return str(d)


def workload(
    rate: float, num: int, seed: int, vocab: int, max_len: int
) -> list[tuple[float, list[int], int]]:
    """(arrival offset s, prompt ids, max_tokens) per request: Poisson arrivals, workload A's
    lengths (up to max_len each)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    top = min(vocab, 10001) - 1
    for _ in range(num):
        t += rng.expovariate(rate)
        prompt = [rng.randint(0, top) for _ in range(rng.randint(min(100, max_len), max_len))]
        out.append((t, prompt, rng.randint(min(100, max_len), max_len)))
    return out


async def one_request(client, base, start, item) -> dict:
    offset, prompt, max_tokens = item
    await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.6,
        "ignore_eos": True,
        "stream": True,
    }
    sent = time.perf_counter()
    stamps = []
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    return {"sent": sent, "stamps": stamps, "max_tokens": max_tokens}


def client_process(base: str, start: float, items: list, conn) -> None:
    async def main():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            return await asyncio.gather(*(one_request(client, base, start, i) for i in items))

    conn.send(asyncio.run(main()))


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}

    def p(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    mean = 1000 * sum(xs) / len(xs)
    return {"p50_ms": p(0.5), "p90_ms": p(0.9), "p99_ms": p(0.99), "mean_ms": mean}


def run_rate(base: str, rate: float, num: int, clients: int, seed: int, max_len: int) -> dict:
    vocab = json.loads(Path(MODEL, "config.json").read_text())["vocab_size"]
    items = workload(rate, num, seed, vocab, max_len)
    start = time.perf_counter() + 1.0  # every client process is up by then
    ctx = mp.get_context("fork")
    procs, pipes = [], []
    for c in range(clients):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=client_process, args=(base, start, items[c::clients], send))
        p.start()
        procs.append(p)
        pipes.append(recv)
    results = [r for recv in pipes for r in recv.recv()]
    for p in procs:
        p.join()
    end = max(r["stamps"][-1] for r in results)
    ttft = [r["stamps"][0] - r["sent"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    e2e = [r["stamps"][-1] - r["sent"] for r in results]
    tokens = sum(r["max_tokens"] for r in results)
    return {
        "rate_req_s": rate,
        "requests": num,
        "output_tokens": tokens,
        "seconds": end - start,
        "output_tok_s": tokens / (end - start),
        "ttft": percentiles(ttft),
        "itl": percentiles(itl),
        "e2e": percentiles(e2e),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: 0.6B shape, random)")
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 16, 64])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per rate")
    ap.add_argument("--max-requests", type=int, default=256)
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--max-len", type=int, default=1024, help="longest prompt and output")
    ap.add_argument("serve_args", nargs="*", help="more `nv-engine serve` flags (after --)")
    a = ap.parse_args()
    global MODEL
    model = MODEL = a.model or bench_model_dir()
    argv = [sys.executable, "-m", "nv_engine", "serve", "--model", model, "--port", "0"]
    if a.model is None:
        argv += ["--load-format", "dummy"]
    server = subprocess.Popen(
        argv + a.serve_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in server.stdout:
            sys.stderr.write(line)
            found = re.search(r"serving .* at (http://[\d.]+:\d+)/v1", line)
            if found:
                base = found.group(1)
                break
        else:
            raise SystemExit("the server exited before it listened")
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}) before it was healthy")
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # warm-up: a few requests through the whole path
        vocab = json.loads(Path(model, "config.json").read_text())["vocab_size"]
        warm = [(0.0, p, 16) for _, p, _ in workload(1.0, 8, 0, vocab, min(200, a.max_len))]
        asyncio.run(_warm(base, warm))
        rows = []
        for rate in a.rates:
            num = min(a.max_requests, max(16, int(rate * a.duration)))
            row = run_rate(base, rate, num, a.clients, int(rate), a.max_len)
            rows.append(row)
            print(json.dumps(row), flush=True)
        print("| rate (req/s) | requests | output tok/s | TTFT p50 / p90 / p99 (ms) | "
              "ITL p50 / p90 / p99 (ms) | E2E p50 / p90 / p99 (s) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for r in rows:
            t, i, e = r["ttft"], r["itl"], r["e2e"]
            print(
                f"| {r['rate_req_s']:g} | {r['requests']} | {r['output_tok_s']:,.0f} | "
                f"{t['p50_ms']:.0f} / {t['p90_ms']:.0f} / {t['p99_ms']:.0f} | "
                f"{i['p50_ms']:.1f} / {i['p90_ms']:.1f} / {i['p99_ms']:.1f} | "
                f"{e['p50_ms'] / 1000:.1f} / {e['p90_ms'] / 1000:.1f} / {e['p99_ms'] / 1000:.1f} |"
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        print(f"server exit code: {server.returncode}", file=sys.stderr)


async def _warm(base: str, items: list) -> None:
    async with httpx.AsyncClient(timeout=None) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_request(client, base, start, i) for i in items))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
