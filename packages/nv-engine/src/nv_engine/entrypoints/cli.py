"""`nv-engine generate` and `nv-engine bench`."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# engine flags: (Config field, type, help); their defaults are Config's
_ENGINE_FLAGS = (
    ("device", str, "auto, cpu, cuda or cuda:N"),
    ("dtype", str, "auto, float32, bfloat16 or float16"),
    ("tensor_parallel_size", int, "GPUs (or CPU processes) the model is split over"),
    ("max_model_len", int, "longest prompt + output, in tokens"),
    ("max_num_seqs", int, "most requests in one batch"),
    ("max_num_batched_tokens", int, "most tokens computed in one step"),
    ("kvcache_block_size", int, "tokens per KV-cache block"),
    ("num_kvcache_blocks", int, "KV-cache blocks (default: sized from memory)"),
    ("gpu_memory_utilization", float, "fraction of GPU memory the engine may take"),
    ("attention_backend", str, "auto, torch, triton or flash-attn"),
    ("kv_cache_dtype", str, "auto (the model's dtype), fp8 (= fp8_e4m3) or fp8_e5m2"),
)


# more spellings of a flag: the short one, vLLM's name
_SHORT_OR_VLLM = {
    "tensor_parallel_size": ["-tp"],
    "kvcache_block_size": ["--block-size"],
    "num_kvcache_blocks": ["--num-gpu-blocks-override"],
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help shows its default."""


def _engine_args(p: argparse.ArgumentParser) -> None:
    from nv_engine.config import Config, EngineTuning

    defaults = {f.name: f.default for c in (Config, EngineTuning) for f in dataclasses.fields(c)}
    g = p.add_argument_group("engine")
    for name, kind, text in _ENGINE_FLAGS:
        flags = ["--" + name.replace("_", "-")] + _SHORT_OR_VLLM.get(name, [])
        g.add_argument(*flags, type=kind, default=defaults[name], help=text)
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        default=defaults["enforce_eager"],
        help="no CUDA graphs",
    )
    g.add_argument(
        "--mix-decode-and-prefill",
        action="store_true",
        default=defaults["mix_decode_and_prefill"],
        help="decode tokens first, prefill chunks in the rest of each step's budget",
    )
    g.add_argument(
        "--peer-all-reduce-max-bytes",
        type=int,
        default=defaults["peer_all_reduce_max_bytes"],
        help="tensor parallelism: bf16 all-reduces up to this size go through peer memory, "
        "fused with the RMSNorm after them, instead of NCCL (0: NCCL always; default: every "
        "step's, for ranks on one machine; see docs/tensor_parallel.md)",
    )
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=defaults["enable_prefix_caching"],
        help="turn prefix caching off (the default keeps it on)",
    )


def _engine_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    keys = [name for name, _, _ in _ENGINE_FLAGS] + [
        "enforce_eager",
        "enable_prefix_caching",
        "mix_decode_and_prefill",
        "peer_all_reduce_max_bytes",
    ]
    return {k: getattr(a, k) for k in keys}


def _model_or_demo(model: str | None) -> str:
    if model is not None:
        return model
    from nv_engine.entrypoints.demo import ensure_demo_model

    model = str(ensure_demo_model())
    print(
        f"[nv] no --model given: using the built-in demo model at {model}\n"
        "[nv] it is a tiny Qwen3 with RANDOM weights: expect gibberish, not language.",
        file=sys.stderr,
    )
    return model


def cmd_generate(a: argparse.Namespace) -> int:
    from nv_engine import LLM, SamplingParams

    model = _model_or_demo(a.model)
    params = SamplingParams(
        temperature=a.temperature,
        max_tokens=a.max_tokens,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        ignore_eos=a.ignore_eos,
    )
    with LLM(model, **_engine_kwargs(a)) as llm:
        if a.chat:
            tok = llm.tokenizer
            if tok is None or not getattr(tok, "chat_template", None):
                raise SystemExit("--chat: this tokenizer has no chat template")
            conversations = [[{"role": "user", "content": p}] for p in a.prompt]
            outputs = llm.chat(conversations, params, use_tqdm=False)
        else:
            outputs = llm.generate(list(a.prompt), params, use_tqdm=False)
    for prompt, out in zip(a.prompt, outputs, strict=True):
        print(
            f"Prompt: {prompt!r}\nCompletion ({out['finish_reason']}, "
            f"{len(out['token_ids'])} tokens): {out['text']!r}\n"
        )
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from nv_engine import LLM
    from nv_engine.entrypoints.bench import (
        nano_vllm_workload,
        run_benchmark,
        shared_prefix_workload,
    )

    if a.model is not None and a.config is not None:
        raise ValueError("bench: give one of --model DIR and --config config.json, not both")
    tmp = None
    kwargs = _engine_kwargs(a)
    model = a.model if a.config is not None else _model_or_demo(a.model)
    if a.config is not None:  # random weights from a config.json alone
        tmp = tempfile.mkdtemp(prefix="nv-bench-")
        shutil.copy(a.config, Path(tmp) / "config.json")
        model = tmp
        kwargs["load_format"] = "dummy"
    elif a.dummy_weights:
        kwargs["load_format"] = "dummy"
    try:
        with LLM(model, **kwargs) as llm:
            vocab = llm.config.hf_config.vocab_size
            if a.workload == "A":
                prompts, params = nano_vllm_workload(
                    a.num_seqs, a.max_input_len, a.max_output_len, vocab
                )
            else:
                prompts, params = shared_prefix_workload(a.num_seqs, vocab=vocab)
            r = run_benchmark(llm, prompts, params)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"workload": a.workload, **kwargs, **r}))
    print(
        f"Total: {r['output_tokens']}tok, Time: {r['seconds']:.2f}s, "
        f"Throughput: {r['tok_per_s']:.2f}tok/s"
    )
    return 0


def cmd_worker(a: argparse.Namespace) -> int:
    from nv_engine.config import Config
    from nv_engine.worker.external_workers import serve_external_worker

    config = Config.from_kwargs(
        a.model,
        load_format=a.load_format,
        distributed_executor_backend="external",
        **_engine_kwargs(a),
    )
    serve_external_worker(config)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import logging
    import os

    from nv_engine import AsyncLLM
    from nv_engine.entrypoints.openai import ServerConfig, run_server

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}")
    if a.max_request_body_bytes < 1:
        raise ValueError("--max-request-body-bytes must be >= 1")
    model = _model_or_demo(a.model)
    config = ServerConfig(
        model_name=a.served_model_name or a.model or "nv-demo",
        host=a.host,
        port=a.port,
        api_key=a.api_key or os.environ.get("NV_API_KEY") or None,
        max_request_body_bytes=a.max_request_body_bytes,
        exit_on_engine_death=a.exit_on_engine_death,
        shutdown_timeout_s=a.shutdown_timeout,
    )
    engine = AsyncLLM(model, load_format=a.load_format, **_engine_kwargs(a))
    return run_server(engine, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nv-engine", description="nv inference engine", formatter_class=_Formatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = "Hugging Face model dir (none: the built-in demo model)"

    g = sub.add_parser("generate", help="complete prompts", formatter_class=_Formatter)
    g.add_argument("--model", default=None, help=demo)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--ignore-eos", action="store_true", help="go on past EOS")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="Nano-vLLM's throughput benchmark", formatter_class=_Formatter)
    b.add_argument("--model", default=None, help=demo)
    b.add_argument("--config", default=None, help="config.json: random weights")
    b.add_argument("--dummy-weights", action="store_true", help="random weights for --model")
    b.add_argument(
        "--workload",
        choices=["A", "P"],
        default="A",
        help="A: Nano-vLLM's; P: 2,048-token shared prefix + 128 own tokens",
    )
    from nv_engine.entrypoints.bench import nano_vllm_workload

    workload = inspect.signature(nano_vllm_workload).parameters  # its defaults are Nano-vLLM's
    for name in ("num_seqs", "max_input_len", "max_output_len"):
        b.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=workload[name].default,
            help="workload A: " + name.replace("_", " "),
        )
    _engine_args(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
        formatter_class=_Formatter,
    )
    s.add_argument("--model", default=None, help=demo)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    s.add_argument(
        "--api-key", default=None, help="required as a Bearer token on /v1/* (or NV_API_KEY)"
    )
    s.add_argument(
        "--served-model-name", default=None, help="the model's name in the API (default: --model)"
    )
    s.add_argument(
        "--max-request-body-bytes", type=int, default=32 << 20, help="larger bodies get a 413"
    )
    s.add_argument(
        "--no-exit-on-engine-death",
        dest="exit_on_engine_death",
        action="store_false",
        help="keep answering 503s once the engine died (the default exits with status 1)",
    )
    s.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights (benchmarks)",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="seconds in-flight requests get on SIGTERM/SIGINT",
    )
    _engine_args(s)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser(
        "worker",
        help="serve one tensor-parallel rank > 0 for an engine on another process or machine "
        "(reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE[, LOCAL_RANK])",
    )
    w.add_argument("--model", required=True)
    w.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    _engine_args(w)
    w.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # a bad flag or config value: one line, exit 2
        print(f"nv-engine {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
