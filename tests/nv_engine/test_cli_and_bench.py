from __future__ import annotations

import json

import pytest
from nv_testing import tiny_qwen3_config

from nv_engine.entrypoints.bench import nano_vllm_workload, shared_prefix_workload
from nv_engine.entrypoints.cli import main


def test_nano_vllm_workload_is_exact():
    prompts, params = nano_vllm_workload()
    assert len(prompts) == 256
    assert sum(p.max_tokens for p in params) == 133_966
    assert all(100 <= len(p) <= 1024 for p in prompts)
    assert all(p.temperature == 0.6 and p.ignore_eos for p in params)


def test_shared_prefix_workload():
    prompts, params = shared_prefix_workload()
    assert len(prompts) == 256 and all(len(p) == 2048 + 128 for p in prompts)
    assert all(p[:2048] == prompts[0][:2048] for p in prompts)
    assert {p.max_tokens for p in params} == {128}


def test_generate_with_demo_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NV_CACHE_DIR", str(tmp_path))
    assert (
        main(
            [
                "generate",
                "--prompt",
                "Hello",
                "--prompt",
                "Hi",
                "--max-tokens",
                "8",
                "--device",
                "cpu",
                "--chat",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "RANDOM weights" in out.err
    assert out.out.count("Completion (") == 2
    # Built deterministically: a second build elsewhere gives identical files.
    first = (tmp_path / "demo-qwen3-v1" / "model.safetensors").read_bytes()
    monkeypatch.setenv("NV_CACHE_DIR", str(tmp_path / "again"))
    assert main(["generate", "--prompt", "x", "--max-tokens", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "again" / "demo-qwen3-v1" / "model.safetensors").read_bytes() == first


def test_bench_from_config_json(tmp_path, capsys):
    cfg = tiny_qwen3_config(vocab_size=10_240).to_dict()
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert (
        main(
            [
                "bench",
                "--config",
                str(tmp_path / "config.json"),
                "--num-seqs",
                "3",
                "--max-input-len",
                "120",
                "--max-output-len",
                "110",
                "--device",
                "cpu",
                "--kvcache-block-size",
                "16",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[0])
    _, params = nano_vllm_workload(3, 120, 110)
    assert result["output_tokens"] == sum(p.max_tokens for p in params)
    assert lines[-1].startswith("Total: ")


def test_cli_engine_defaults_are_configs():
    import dataclasses

    from nv_engine.config import Config, EngineTuning
    from nv_engine.entrypoints.cli import _engine_kwargs, build_parser

    defaults = {f.name: f.default for c in (Config, EngineTuning) for f in dataclasses.fields(c)}
    for argv in (["generate", "--prompt", "x"], ["bench"]):
        kwargs = _engine_kwargs(build_parser().parse_args(argv))
        assert kwargs == {k: defaults[k] for k in kwargs}
    argv = ["bench", "-tp", "2", "--max-num-seqs", "8", "--peer-all-reduce-max-bytes", "8388608"]
    kwargs = _engine_kwargs(build_parser().parse_args(argv))
    assert (kwargs["tensor_parallel_size"], kwargs["max_num_seqs"]) == (2, 8)
    assert kwargs["peer_all_reduce_max_bytes"] == 8 << 20


def test_bench_runs_on_the_demo_model_with_short_lengths(tmp_path, monkeypatch, capsys):
    # no --model: the demo model (vocabulary of 128): token ids must stay inside it, and
    # lengths under Nano-vLLM's 100-token minimum must work
    monkeypatch.setenv("NV_CACHE_DIR", str(tmp_path))
    argv = ["bench", "--num-seqs", "3", "--max-input-len", "12", "--max-output-len", "5"]
    assert main([*argv, "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    _, params = nano_vllm_workload(3, 12, 5, vocab_size=128)
    assert result["output_tokens"] == sum(p.max_tokens for p in params)
    prompts, _ = nano_vllm_workload(3, 12, 5, vocab_size=128)
    assert all(0 <= t < 128 for p in prompts for t in p) and all(1 <= len(p) <= 12 for p in prompts)


def test_kv_cache_dtype_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NV_CACHE_DIR", str(tmp_path))
    argv = ["generate", "--prompt", "Hello", "--max-tokens", "4", "--device", "cpu"]
    assert main([*argv, "--kv-cache-dtype", "fp8"]) == 0
    assert capsys.readouterr().out.count("Completion (") == 1
    assert main([*argv, "--kv-cache-dtype", "int4"]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(errors) == 1 and "kv_cache_dtype" in errors[0]


def test_peer_all_reduce_covers_every_step_for_spawned_ranks(tmp_path):
    """peer_all_reduce_max_bytes=None (the default) means the peer path for every message of
    two ranks spawned on one machine (a full step's: max_num_batched_tokens rows of the hidden
    size, in bf16), for decode-sized ones with more ranks, and NCCL for ranks started elsewhere;
    a number is taken as given; a bad one is an error naming the field."""
    from nv_engine.config import PEER_ALL_REDUCE_MANY_RANKS_BYTES, Config, EngineTuning

    assert EngineTuning().peer_all_reduce_max_bytes is None
    for value in (-1, 1.5, "8"):
        with pytest.raises((ValueError, TypeError), match="peer_all_reduce_max_bytes"):
            EngineTuning(peer_all_reduce_max_bytes=value)

    tiny_qwen3_config().save_pretrained(tmp_path)  # a config.json is all Config reads

    def resolved(backend: str, chosen: int | None, ranks: int = 2) -> int:
        config = Config.from_kwargs(
            str(tmp_path),
            device="cpu",
            max_num_batched_tokens=512,
            tensor_parallel_size=ranks,
            distributed_executor_backend=backend,
            peer_all_reduce_max_bytes=chosen,
        )
        return config.peer_all_reduce_bytes()

    assert resolved("mp", None) == 512 * tiny_qwen3_config().hidden_size * 2
    # more ranks: decode-sized messages only (each rank reads every other's whole message)
    assert resolved("mp", None, ranks=4) == PEER_ALL_REDUCE_MANY_RANKS_BYTES
    assert resolved("external", None) == 0
    assert resolved("mp", 0) == 0
    assert resolved("external", 1 << 20) == 1 << 20
