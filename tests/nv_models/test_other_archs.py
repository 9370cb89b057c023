"""Qwen2, Llama, Mistral and biased variants against Hugging Face, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from nv_testing import TINY, hf_logits, load_ours
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from nv_engine import LLM, SamplingParams
from nv_kernels import AttentionMetadata


def _save(path, cls, config_cls, arch, **kw):
    torch.manual_seed(0)
    config = config_cls(**{**TINY, **kw})
    config.architectures = [arch]
    model = cls(config).float().eval()
    with torch.no_grad():  # make biases non-zero so that a dropped bias would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize(
    "cls,config_cls,arch,kw",
    [
        (Qwen2ForCausalLM, Qwen2Config, "Qwen2ForCausalLM", {}),
        (LlamaForCausalLM, LlamaConfig, "LlamaForCausalLM", dict(head_dim=16)),
        (LlamaForCausalLM, LlamaConfig, "LlamaForCausalLM", dict(attention_bias=True)),
        (Qwen3ForCausalLM, Qwen3Config, "Qwen3ForCausalLM", dict(attention_bias=True, head_dim=16)),
        (MistralForCausalLM, MistralConfig, "MistralForCausalLM", dict(sliding_window=None)),
    ],
    ids=["qwen2", "llama", "llama-bias", "qwen3-bias", "mistral"],
)
def test_logits_and_greedy_match_hf(tmp_path, cls, config_cls, arch, kw):
    hf = _save(tmp_path, cls, config_cls, arch, **kw)
    ours = load_ours(tmp_path)
    prompt = torch.randint(3, 512, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    cu = torch.tensor([0, 13], dtype=torch.int32)
    meta = AttentionMetadata(True, torch.full((13,), -1), None, None, cu, cu, 13, 13)
    with torch.no_grad():
        logits = ours.compute_logits(ours(torch.tensor(prompt), torch.arange(13), meta))
    assert (logits - hf_logits(hf, prompt)).abs().max().item() <= 1e-4
    ref = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, 13:].tolist()
    with LLM(str(tmp_path), device="cpu", kvcache_block_size=4) as llm:
        out = llm.generate(
            [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
        )[0]
    assert out["token_ids"] == ref


LLAMA3 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128)


@pytest.mark.parametrize(
    "cls,config_cls,arch,scaling",
    [
        (LlamaForCausalLM, LlamaConfig, "LlamaForCausalLM", LLAMA3),
        (LlamaForCausalLM, LlamaConfig, "LlamaForCausalLM", dict(rope_type="linear", factor=2.0)),
        (Qwen3ForCausalLM, Qwen3Config, "Qwen3ForCausalLM", YARN),
        (Qwen3ForCausalLM, Qwen3Config, "Qwen3ForCausalLM", dict(YARN, mscale=2, mscale_all_dim=1)),
    ],
    ids=["llama3", "linear", "yarn", "yarn-mscale"],
)
def test_rope_scaling_matches_hf(tmp_path, cls, config_cls, arch, scaling):
    hf = _save(tmp_path, cls, config_cls, arch, head_dim=16, rope_scaling=dict(scaling))
    ours = load_ours(tmp_path)
    default = torch.arange(0, 16, 2).float() / 16
    default_table = torch.outer(torch.arange(512).float(), 1.0 / 10000.0**default).cos()
    assert not torch.allclose(ours.model.rotary_emb.cos_sin_cache[:, :8], default_table)
    n = 90  # past the llama3 / yarn original context, so every frequency band is exercised
    prompt = torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    cu = torch.tensor([0, n], dtype=torch.int32)
    meta = AttentionMetadata(True, torch.full((n,), -1), None, None, cu, cu, n, n)
    with torch.no_grad():
        logits = ours.compute_logits(ours(torch.tensor(prompt), torch.arange(n), meta))
    assert (logits - hf_logits(hf, prompt)).abs().max().item() <= 1e-4
    ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, n:].tolist()
    with LLM(str(tmp_path), device="cpu", kvcache_block_size=16) as llm:
        out = llm.generate(
            [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
        )[0]
    assert out["token_ids"] == ref


def test_unsupported_rope_scaling_is_a_clear_error(tmp_path):
    _save(
        tmp_path,
        LlamaForCausalLM,
        LlamaConfig,
        "LlamaForCausalLM",
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    with pytest.raises(ValueError, match="rope scaling type 'dynamic'"):
        load_ours(tmp_path)


def test_sliding_window_caps_max_model_len(tmp_path):
    hf = _save(tmp_path, MistralForCausalLM, MistralConfig, "MistralForCausalLM", sliding_window=24)
    prompt = torch.randint(3, 512, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    with LLM(str(tmp_path), device="cpu", kvcache_block_size=4) as llm:
        assert llm.config.max_model_len == 24  # full attention equals the window's up to here
        out = llm.generate(
            [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
        )[0]
        with pytest.raises(ValueError, match="max_model_len=24"):
            llm.generate([prompt * 3], SamplingParams(max_tokens=1), use_tqdm=False)
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 14
    ref = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=14,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, 10:].tolist()
    assert out["token_ids"] == ref
