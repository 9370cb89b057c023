"""Tensor-parallel scaling on a 2-GPU machine, for docs/benchmarks.md.

    python benchmarks/tp_bench.py [sections...]   # default: allreduce scaling
sections:
  allreduce  one all-reduce of a [rows, hidden] bf16 message (rows 1..16384; hidden 1024 and
             4096), NCCL against PeerAllReduce (symmetric memory: `peer` one-shot, `peer2`
             two-shot), each call timed as
             72 back-to-back calls in one CUDA graph; and per decode step (2 per layer + 1)
  scaling    workload A on the Qwen3-8B and Qwen3-0.6B shapes: TP=1, TP=2 (overlapped
             scheduling), TP=2 with scheduling synchronous, TP=2 with PeerAllReduce (one-shot,
             two-shot)
  profile    8B shape, 256 sequences decoding: wall ms per step at TP=1 and TP=2 (NCCL, peer),
             and rank 0's GPU kernels per step (torch.profiler)
  phases     workload A on the 8B shape with every LLM.step timed, summed by kind and batch
             size (a step's time is the wait for the step before it, with overlapped
             scheduling): where TP=2 gains or loses against TP=1
TP_SHAPES=8b and TP_RUNS=tp1,tp2_peer (tags as reported) run a subset; each run is a fresh
process (a process joins torch's symmetric memory once).
Prints one JSON line per result.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_bench import QWEN3_06B, make_llm, profile_decode  # noqa: E402

QWEN3_8B = json.loads((HERE / "configs" / "qwen3-8b.json").read_text())
ROWS = (1, 8, 32, 64, 128, 256, 512, 2048, 16384)
CALLS = 72  # about one decode step's all-reduces on the 8B shape (2 x 36 layers)


def report(name: str, **values) -> None:
    print(json.dumps({"name": name, **values}), flush=True)


def _allreduce_rank(rank: int, store_path: str) -> None:
    from nv_models import PeerAllReduce

    torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2)
    device = torch.device("cuda", rank)
    group = dist.group.WORLD
    peers = {
        "peer": PeerAllReduce(group, device, 64 << 20),
        "peer2": PeerAllReduce(group, device, 64 << 20, algorithm="two_shot"),
    }
    for hidden in (1024, 4096):
        for rows in ROWS:
            torch.manual_seed(rows)  # the same x on both ranks
            x = torch.randn(rows, hidden, dtype=torch.bfloat16, device=device)
            ref = x.float() * 2
            row = {"hidden": hidden, "rows": rows, "mbytes": round(x.numel() * 2 / 2**20, 3)}
            for name in ("nccl", *peers):
                if name != "nccl" and not peers[name].handles(x):
                    continue

                def op(y: torch.Tensor, name: str = name) -> None:
                    if name == "nccl":
                        dist.all_reduce(y, group=group)
                    else:
                        peers[name].all_reduce(y)

                y = x.clone()
                op(y)
                torch.cuda.synchronize()
                err = (y.float() - ref).abs().max().item()
                bufs = [x.clone() for _ in range(4)]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for i in range(CALLS):
                        op(bufs[i % 4])
                for _ in range(3):
                    graph.replay()
                torch.cuda.synchronize()
                dist.barrier()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                reps = 10
                for _ in range(reps):
                    graph.replay()
                e1.record()
                e1.synchronize()
                us = e0.elapsed_time(e1) * 1e3 / (reps * CALLS)
                row[f"{name}_us"] = round(us, 2)
                row[f"{name}_max_err"] = err
                del graph
            if rank == 0:
                report("allreduce", **row)
    dist.barrier()
    dist.destroy_process_group()


def allreduce() -> None:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_allreduce_rank, args=(os.path.join(d, "store"),), nprocs=2, join=True)


def tp_runs(cfg: dict) -> list[tuple[str, dict]]:
    """The engine settings compared, by tag; TP_RUNS (comma-separated tags) picks a subset."""
    every_step = 16384 * cfg["hidden_size"] * 2  # a full prefill step's message, in bytes
    nccl = dict(tensor_parallel_size=2, peer_all_reduce_max_bytes=0)
    runs = [
        ("tp1", dict(tensor_parallel_size=1)),
        ("tp2", nccl),
        ("tp2_sync", dict(nccl, async_scheduling=False)),
        ("tp2_peer", dict(tensor_parallel_size=2, peer_all_reduce_max_bytes=8 << 20)),
        (
            "tp2_peer2",
            dict(
                tensor_parallel_size=2,
                peer_all_reduce_max_bytes=8 << 20,
                peer_all_reduce_algorithm="two_shot",
            ),
        ),
        # every step's norms fused with their all-reduce through peer memory, prefill's too
        ("tp2_peer_all", dict(tensor_parallel_size=2, peer_all_reduce_max_bytes=every_step)),
        ("tp2_default", dict(tensor_parallel_size=2)),  # as a user gets it
    ]
    return [r for r in runs if r[0] in os.environ.get("TP_RUNS", r[0]).split(",")]


def in_own_processes(section: str) -> None:
    """Run `section` once per engine setting and shape, each in a fresh process: a process
    joins torch's symmetric memory once (PeerAllReduce.unavailable), so a second peer-memory
    engine in it would run on NCCL. Forwards each run's JSON lines, adding to scaling's the
    speedup over the shape's first run (tp1)."""
    import subprocess

    shapes = os.environ.get("TP_SHAPES", "8b,0.6b" if section == "scaling" else "8b")
    for shape in shapes.split(","):
        base = None
        for tag, _ in tp_runs(QWEN3_8B):
            env = dict(os.environ, TP_CHILD="1", TP_SHAPES=shape, TP_RUNS=tag)
            argv = [sys.executable, __file__, section]
            r = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
            for line in r.stdout.splitlines():
                if line.startswith("{") and section == "scaling":
                    row = json.loads(line)
                    if "tok_per_s" in row:
                        base = base or row["tok_per_s"]
                        row["speedup_vs_first"] = round(row["tok_per_s"] / base, 3)
                    line = json.dumps(row)
                print(line, flush=True)
            if r.returncode:
                report(f"{section}_{shape}_{tag}_FAILED", returncode=r.returncode)


def peer_used(llm) -> bool:
    return llm.model_runner.tp.peer is not None


def scaling() -> None:
    from nv_engine.entrypoints.bench import nano_vllm_workload, run_benchmark

    prompts, params = nano_vllm_workload()
    shapes = os.environ.get("TP_SHAPES", "8b,0.6b").split(",")  # a subset, for a short call
    for shape, cfg in (("8b", QWEN3_8B), ("0.6b", QWEN3_06B)):
        if shape not in shapes:
            continue
        for tag, kw in tp_runs(cfg):
            t = time.perf_counter()
            try:
                with make_llm(cfg, kvcache_block_size=256, **kw) as llm:
                    start = time.perf_counter() - t
                    r = run_benchmark(llm, prompts, params)
                    peer = peer_used(llm)
            except Exception as e:  # keep going: report and try the next setting
                report(f"scaling_{shape}_{tag}_FAILED", error=repr(e)[:500])
                continue
            report(
                f"scaling_{shape}_{tag}",
                tok_per_s=round(r["tok_per_s"]),
                seconds=round(r["seconds"], 2),
                output_tokens=r["output_tokens"],
                peer_all_reduce=peer,
                startup_s=round(start, 1),
            )


def profile() -> None:
    for tag, kw in tp_runs(QWEN3_8B):
        with make_llm(QWEN3_8B, kvcache_block_size=256, **kw) as llm:
            wall, gpu = profile_decode(llm, 256, 500, f"# 8b {tag} batch 256 (rank 0's kernels)")
            report(
                f"profile_8b_{tag}", batch=256, wall_ms=round(wall, 3), gpu_ms=round(gpu / 1e3, 3)
            )


PHASES = ((1, 16), (17, 64), (65, 128), (129, 192), (193, 255), (256, 256))  # decode rows


def phases() -> None:
    from nv_engine.entrypoints.bench import nano_vllm_workload, run_benchmark

    prompts, params = nano_vllm_workload()
    for tag, kw in tp_runs(QWEN3_8B):
        with make_llm(QWEN3_8B, kvcache_block_size=256, **kw) as llm:
            steps: list[tuple[bool, int, float]] = []  # (prefill, tokens, seconds)
            step = llm.step

            def timed_step():
                t = time.perf_counter()
                out = step()
                steps.append((*llm.last_step, time.perf_counter() - t))
                return out

            llm.step = timed_step
            r = run_benchmark(llm, prompts, params)
            peer = peer_used(llm)
        sums: dict[str, list[float]] = {}
        for prefill, tokens, seconds in steps:
            kind = "prefill" if prefill else next(
                f"decode {a}-{b}" for a, b in PHASES if a <= tokens <= b
            )  # fmt: skip
            total = sums.setdefault(kind, [0, 0.0])
            total[0] += 1
            total[1] += seconds
        report(
            f"phases_8b_{tag}",
            tok_per_s=round(r["tok_per_s"]),
            seconds=round(r["seconds"], 3),
            peer_all_reduce=peer,
            steps={k: [n, round(s, 3)] for k, (n, s) in sorted(sums.items())},
        )


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for s in sys.argv[1:] or ["allreduce", "scaling"]:
        t = time.perf_counter()
        if s != "allreduce" and not os.environ.get("TP_CHILD"):
            in_own_processes(s)
        else:
            {"allreduce": allreduce, "scaling": scaling, "profile": profile, "phases": phases}[s]()
        print(f"# section {s}: {time.perf_counter() - t:.1f}s", flush=True)


if __name__ == "__main__":
    main()
