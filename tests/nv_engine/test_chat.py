"""LLM.chat: conversations through the tokenizer's chat template, against Hugging Face."""

from __future__ import annotations

import pytest
import torch
from nv_testing import hf_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from nv_engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def demo_dir(demo_model_dir):
    return demo_model_dir


def test_chat_renders_the_template_and_matches_hf(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    hf = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    conversations = [
        [{"role": "user", "content": "Hello there"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Again?"},
        ],
    ]
    with LLM(str(demo_dir), device="cpu") as llm:
        outs = llm.chat(conversations, GREEDY, use_tqdm=False)
        single = llm.chat(conversations[0], GREEDY, use_tqdm=False)
    assert len(outs) == 2 and len(single) == 1
    assert single[0]["token_ids"] == outs[0]["token_ids"]
    for conv, out in zip(conversations, outs, strict=True):
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        ids = tok.encode(text, add_special_tokens=False)
        assert out["prompt_token_ids"] == ids
        assert [out["token_ids"]] == hf_greedy(hf, [ids], [6])


def test_chat_continues_the_final_message(demo_dir):
    # vLLM's continue_final_message: a prefilled assistant reply, left open for the model
    tok = AutoTokenizer.from_pretrained(demo_dir)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, I"}]
    with LLM(str(demo_dir), device="cpu") as llm:
        (out,) = llm.chat(
            conv, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True
        )
        with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt"):
            llm.chat(conv, GREEDY, use_tqdm=False, continue_final_message=True)
    text = tok.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nWell, I")  # no end-of-turn after it
    assert out["prompt_token_ids"] == tok.encode(text, add_special_tokens=False)


def test_chat_bad_input_is_a_clear_error(demo_dir, tmp_path):
    with LLM(str(demo_dir), device="cpu") as llm:
        with pytest.raises(ValueError, match=r"messages\[1\]\[0\] must be a dict"):
            llm.chat([[{"role": "user", "content": "a"}], [{"content": "no role"}]], GREEDY)
        with pytest.raises(TypeError, match="messages must be"):
            llm.chat("not a conversation", GREEDY)
        assert llm.chat([{"role": "user", "content": "ok"}], GREEDY, use_tqdm=False)[0]["text"]
        assert llm.scheduler.block_manager.num_free_blocks == llm.scheduler.block_manager.num_blocks
    # no tokenizer (token-id-only model directory): chat cannot render anything
    for f in demo_dir.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with LLM(str(tmp_path), device="cpu") as llm, pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "a"}], GREEDY)
