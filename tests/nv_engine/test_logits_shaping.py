"""vLLM's logit_bias, allowed_token_ids and bad_words, greedy, token for token against
transformers' generate with the same logits processing (sequence_bias, a mask, bad_words_ids),
with overlapped and synchronous scheduling."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from nv_engine import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Hello there, how"]
N = 16


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    path = demo_model_dir
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def llm(demo, request):
    with LLM(str(demo[0]), device="cpu", async_scheduling=request.param) as llm:
        yield llm


@torch.no_grad()
def _hf(hf, tok, prompt: str, **kw) -> list[int]:
    ids = tok.encode(prompt)
    out = hf.generate(
        torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=None,
        **kw,
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


def _ours(llm, **kw) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, **kw)
    return [o["token_ids"] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_logit_bias_matches_sequence_bias(demo, llm):
    _, hf, tok = demo
    plain = _ours(llm)
    # push the model towards tokens it did not pick, and away from one it did
    bias = {plain[0][0]: -100.0, plain[0][3]: 4.0, 40: 2.5}
    got = _ours(llm, logit_bias=bias)
    assert got != plain
    refs = [_hf(hf, tok, p, sequence_bias={(t,): b for t, b in bias.items()}) for p in PROMPTS]
    assert got == refs


class _Allowed(LogitsProcessor):
    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def __call__(self, input_ids, scores):
        keep = torch.full_like(scores, float("-inf"))
        keep[:, self.allowed] = 0
        return scores + keep


def test_allowed_token_ids(demo, llm):
    _, hf, tok = demo
    allowed = [50, 51, 60, 70, 81]
    got = _ours(llm, allowed_token_ids=allowed)
    assert all(t in allowed for out in got for t in out)
    refs = [
        _hf(hf, tok, p, logits_processor=LogitsProcessorList([_Allowed(allowed)])) for p in PROMPTS
    ]
    assert got == refs


def test_bad_words_match_bad_words_ids(demo, llm):
    _, hf, tok = demo
    plain = _ours(llm)
    # words the model does write: a printable two-character bigram from each output
    words = []
    for out in plain:
        text = [tok.decode([t]) for t in out]
        i = next(
            i
            for i in range(len(text) - 1)
            if (text[i] + text[i + 1]).strip() == text[i] + text[i + 1]
        )
        words.append(text[i] + text[i + 1])
    got = _ours(llm, bad_words=words)
    assert got != plain
    bad_ids = []
    for w in words:
        for spelled in (w, " " + w):
            ids = tok.encode(spelled, add_special_tokens=False)
            if ids not in bad_ids:
                bad_ids.append(ids)
    for out in got:  # no bad word anywhere in the output
        for ids in bad_ids:
            assert not any(out[i : i + len(ids)] == ids for i in range(len(out)))
    # (the prompts do not end in a bad word's first tokens, so HF's matching over the whole
    # sequence and vLLM's over the output agree)
    refs = [_hf(hf, tok, p, bad_words_ids=bad_ids) for p in PROMPTS]
    assert got == refs


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(logit_bias={5: 101.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias=[1, 2]), "logit_bias"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(allowed_token_ids=["a"]), "allowed_token_ids"),
        (dict(bad_words=[""]), "bad_words"),
        (dict(bad_words="word"), "bad_words"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        SamplingParams(**kwargs)


def test_token_ids_outside_the_vocabulary(llm):
    vocab = llm.config.hf_config.vocab_size
    for kwargs, field in (
        (dict(logit_bias={vocab: 1.0}), "logit_bias"),
        (dict(allowed_token_ids=[1, vocab]), "allowed_token_ids"),
    ):
        with pytest.raises(ValueError, match=field):
            llm.generate(["x"], SamplingParams(**kwargs), use_tqdm=False)
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
