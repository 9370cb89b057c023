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

# engine flags: (Config field, type); their defaults are Config's
_ENGINE_FLAGS = (
    ("device", str),
    ("dtype", str),
    ("tensor_parallel_size", int),
    ("max_model_len", int),
    ("max_num_seqs", int),
    ("max_num_batched_tokens", int),
    ("kvcache_block_size", int),
    ("num_kvcache_blocks", int),
    ("gpu_memory_utilization", float),
    ("attention_backend", str),
)


def _engine_args(p: argparse.ArgumentParser) -> None:
    from nv_engine.config import Config

    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    g = p.add_argument_group("engine")
    for name, kind in _ENGINE_FLAGS:
        flags = ["--" + name.replace("_", "-")] + (
            ["-tp"] if name == "tensor_parallel_size" else []
        )
        g.add_argument(*flags, type=kind, default=defaults[name])
    g.add_argument("--enforce-eager", action="store_true", default=defaults["enforce_eager"])
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=defaults["enable_prefix_caching"],
    )


def _engine_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    keys = [name for name, _ in _ENGINE_FLAGS] + ["enforce_eager", "enable_prefix_caching"]
    return {k: getattr(a, k) for k in keys}


def cmd_generate(a: argparse.Namespace) -> int:
    from nv_engine import LLM, SamplingParams

    model = a.model
    if model is None:
        from nv_engine.demo import ensure_demo_model

        model = str(ensure_demo_model())
        print(
            f"[nv] no --model given: using the built-in demo model at {model}\n"
            "[nv] it is a tiny Qwen3 with RANDOM weights: expect gibberish, not language.",
            file=sys.stderr,
        )
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
    from nv_engine.bench import nano_vllm_workload, run_benchmark, shared_prefix_workload

    if (a.model is None) == (a.config is None):
        raise SystemExit("bench: give exactly one of --model DIR or --config config.json")
    tmp = None
    kwargs = _engine_kwargs(a)
    model = a.model
    if a.config is not None:  # random weights from a config.json alone
        tmp = tempfile.mkdtemp(prefix="nv-bench-")
        shutil.copy(a.config, Path(tmp) / "config.json")
        model = tmp
        kwargs["load_format"] = "dummy"
    elif a.dummy_weights:
        kwargs["load_format"] = "dummy"
    try:
        if a.workload == "A":
            prompts, params = nano_vllm_workload(a.num_seqs, a.max_input_len, a.max_output_len)
        else:
            prompts, params = shared_prefix_workload(a.num_seqs)
        with LLM(model, **kwargs) as llm:
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
    from nv_engine.workers import serve_external_worker

    config = Config.from_kwargs(
        a.model,
        load_format=a.load_format,
        distributed_executor_backend="external",
        **_engine_kwargs(a),
    )
    serve_external_worker(config)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from nv_engine import LLM
    from nv_engine.server import EngineLoop, OpenAIServer

    llm = LLM(a.model, **_engine_kwargs(a))
    loop = EngineLoop(llm)
    loop.start()
    server = OpenAIServer((a.host, a.port), loop, a.served_model_name or a.model)
    host, port = server.server_address[:2]
    print(f"[nv] serving {a.model} at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        loop.stop()
        llm.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nv-engine", description="nv inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete prompts")
    g.add_argument("--model", default=None, help="Hugging Face model dir (default: demo model)")
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="Nano-vLLM's throughput benchmark")
    b.add_argument("--model", default=None)
    b.add_argument("--config", default=None, help="config.json: random weights")
    b.add_argument("--dummy-weights", action="store_true", help="random weights for --model")
    b.add_argument(
        "--workload",
        choices=["A", "P"],
        default="A",
        help="A: Nano-vLLM's; P: 2,048-token shared prefix + 128 own tokens",
    )
    from nv_engine.bench import nano_vllm_workload

    workload = inspect.signature(nano_vllm_workload).parameters  # its defaults are Nano-vLLM's
    for name in ("num_seqs", "max_input_len", "max_output_len"):
        b.add_argument("--" + name.replace("_", "-"), type=int, default=workload[name].default)
    _engine_args(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, chat)")
    s.add_argument("--model", required=True, help="Hugging Face model dir")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API")
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
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
