"""Qwen2, Llama, Mistral and biased variants against Hugging Face, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from nv_testing import TINY, hf_greedy, hf_logits, load_ours
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


def _assert_matches_hf(hf, path, prompt: list[int], max_new: int, block_size: int) -> None:
    """Our logits for `prompt` (one packed prefill) within 1e-4 of HF's, and the engine's greedy
    tokens equal to HF's `generate`."""
    ours = load_ours(path)
    n = len(prompt)
    cu = torch.tensor([0, n], dtype=torch.int32)
    meta = AttentionMetadata(True, torch.full((n,), -1), None, None, cu, cu, n, n)
    with torch.no_grad():
        logits = ours.compute_logits(ours(torch.tensor(prompt), torch.arange(n), meta))
    assert (logits - hf_logits(hf, prompt)).abs().max().item() <= 1e-4
    (ref,) = hf_greedy(hf, [prompt], [max_new])
    with LLM(str(path), device="cpu", kvcache_block_size=block_size) as llm:
        out = llm.generate(
            [prompt],
            SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True),
            use_tqdm=False,
        )[0]
    assert out["token_ids"] == ref


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
    prompt = torch.randint(3, 512, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    _assert_matches_hf(hf, tmp_path, prompt, max_new=12, block_size=4)


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
    default = torch.arange(0, 16, 2).float() / 16
    default_table = torch.outer(torch.arange(512).float(), 1.0 / 10000.0**default).cos()
    table = load_ours(tmp_path).model.rotary_emb.cos_sin_cache
    assert not torch.allclose(table[:, :8], default_table)  # the scaling changes the table
    # 90 tokens: past the llama3 / yarn original context, so every frequency band is exercised
    prompt = torch.randint(3, 512, (90,), generator=torch.Generator().manual_seed(2)).tolist()
    _assert_matches_hf(hf, tmp_path, prompt, max_new=8, block_size=16)


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
    assert [out["token_ids"]] == hf_greedy(hf, [prompt], [14])
