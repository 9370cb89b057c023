"""Sampling, stopping and bad input through the public API, on a tiny model with a tokenizer."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from nv_testing import save_tiny_qwen3

from nv_engine import LLM, Config, SamplingParams
from nv_engine.entrypoints.demo import build_char_tokenizer


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("text-model")
    tok = build_char_tokenizer()
    save_tiny_qwen3(
        path,
        seed=3,
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(text_model):
    with LLM(str(text_model), device="cpu", kvcache_block_size=4, num_kvcache_blocks=64) as llm:
        yield llm


@pytest.fixture(autouse=True)
def pool_whole_after(request):
    yield
    if "llm" in request.fixturenames:
        bm = request.getfixturevalue("llm").scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        assert all(b.ref_count == 0 for b in bm.blocks)


PROMPTS = ["Hello there", "The quick brown fox", "a", "Numbers: 1 2 3 4 5 6 7 8 9"]


def test_text_and_token_ids_agree(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert [len(o["token_ids"]) for o in outs] == [12] * 4
    for o in outs:
        assert o["finish_reason"] == "length"
        assert o["text"] == llm.tokenizer.decode(o["token_ids"], skip_special_tokens=True)
    assert outs[0]["prompt_token_ids"] == llm.tokenizer.encode(PROMPTS[0])


def test_seeded_sampling_reproducible_across_runs_and_batches(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    alone = llm.generate([PROMPTS[1]], p, use_tqdm=False)[0]["token_ids"]
    again = llm.generate([PROMPTS[1]], p, use_tqdm=False)[0]["token_ids"]
    others = [SamplingParams(temperature=0.8, max_tokens=9, seed=s) for s in (1, 2, 3)]
    batched = llm.generate(
        [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]],
        [others[0], others[1], p, others[2]],
        use_tqdm=False,
    )[2]["token_ids"]
    assert alone == again == batched
    different = llm.generate(
        [PROMPTS[1]],
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99),
        use_tqdm=False,
    )[0]["token_ids"]
    assert different != alone


def test_unseeded_sampling_varies(llm):
    p = SamplingParams(temperature=1.0, max_tokens=16)
    a = llm.generate([PROMPTS[1]] * 4, p, use_tqdm=False)
    assert len({tuple(o["token_ids"]) for o in a}) > 1


def test_stop_string_cuts_text(llm):
    base = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[
        0
    ]
    text = base["text"]
    stop = text[5:7]
    cut = text.find(stop)
    out = llm.generate(
        [PROMPTS[3]], SamplingParams(temperature=0, max_tokens=20, stop=[stop]), use_tqdm=False
    )[0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[:cut]
    assert stop not in out["text"]
    assert out["token_ids"] == base["token_ids"][: len(out["token_ids"])]
    assert len(out["token_ids"]) < 20


def test_stop_token_ids(llm):
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[
        0
    ]["token_ids"]
    stop_tok = base[6]
    out = llm.generate(
        [PROMPTS[0]],
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok]),
        use_tqdm=False,
    )[0]
    assert out["finish_reason"] == "stop"
    assert out["token_ids"] == base[: base.index(stop_tok) + 1]


def test_eos_and_ignore_eos(text_model, tmp_path):
    with LLM(str(text_model), device="cpu", kvcache_block_size=4) as llm:
        base = llm.generate(
            [PROMPTS[2]], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False
        )[0]["token_ids"]
    # The same weights, with the token greedy decoding emits 4th declared as EOS.
    copy = tmp_path / "m"
    shutil.copytree(text_model, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["eos_token_id"] = base[3]
    (copy / "config.json").write_text(json.dumps(cfg))
    with LLM(str(copy), device="cpu", kvcache_block_size=4) as llm:
        stopped = llm.generate(
            [PROMPTS[2]], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False
        )[0]
        ignored = llm.generate(
            [PROMPTS[2]],
            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
            use_tqdm=False,
        )[0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["token_ids"] == base[: base.index(base[3]) + 1]
    assert ignored["finish_reason"] == "length" and ignored["token_ids"] == base


def test_streaming_api(llm):
    params = SamplingParams(temperature=0, max_tokens=5)
    ids = [llm.add_request(p, params) for p in PROMPTS[:2]]
    done, deltas, delta_ids = {}, {i: "" for i in ids}, {i: [] for i in ids}
    while not llm.is_finished():
        for out in llm.step():
            assert not done.get(out.request_id)  # nothing after the final output
            deltas[out.request_id] += out.delta_text
            delta_ids[out.request_id] += out.delta_token_ids
            assert out.token_ids == delta_ids[out.request_id]
            done[out.request_id] = out.finished and out
    assert sorted(done) == sorted(ids)
    ref = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    for rid, r in zip(ids, ref, strict=True):
        assert done[rid].token_ids == r["token_ids"] and len(r["token_ids"]) == 5
        assert deltas[rid] == done[rid].text == r["text"] == done[rid]["text"]
        assert done[rid].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens="8"), "max_tokens"),
        (dict(temperature="hot"), "temperature"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(seed=1.5), "seed"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=9, max_tokens=8), "min_tokens"),
        (dict(min_tokens=2.0), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=True), "logprobs"),
        (dict(prompt_logprobs=-2), "prompt_logprobs"),
        (dict(skip_special_tokens=1), "skip_special_tokens"),
        (dict(include_stop_str_in_output="yes"), "include_stop_str_in_output"),
        (dict(n=0), "n must"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(frequency_penalty=2.5), "frequency_penalty"),
        (dict(presence_penalty="x"), "presence_penalty"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_and_next_request_succeeds(llm):
    vocab = llm.config.hf_config.vocab_size
    max_len = llm.config.max_model_len
    bad = [
        ("", ValueError, "empty"),
        ([], ValueError, "empty"),
        ([1, vocab], ValueError, "token id"),
        ([1, -3], ValueError, "token id"),
        ([0] * (max_len + 1), ValueError, "max_model_len"),
        (3.5, TypeError, "prompt"),
    ]
    for prompt, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            llm.generate([PROMPTS[0], prompt], SamplingParams(max_tokens=3), use_tqdm=False)
        with pytest.raises(exc, match=msg):
            llm.add_request(prompt)
        assert llm.is_finished()
    with pytest.raises(TypeError, match="sampling_params must be SamplingParams or a list"):
        llm.generate([PROMPTS[0]], {"max_tokens": 3}, use_tqdm=False)
    assert llm.is_finished()
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 3


def test_prompt_larger_than_cache_rejected(text_model):
    with LLM(str(text_model), device="cpu", kvcache_block_size=4, num_kvcache_blocks=4) as llm:
        assert llm.config.max_model_len == 16  # capped to what the cache holds
        # in the engine's resolved copy: the Config the model runner got is not changed
        assert (
            llm.model_runner.config.max_model_len == 512
            and llm.model_runner.config is not llm.config
        )
        with pytest.raises(ValueError, match="max_model_len"):
            llm.generate(["x" * 40], use_tqdm=False)
        out = llm.generate(["hi"], SamplingParams(max_tokens=30), use_tqdm=False)[0]
        assert out["finish_reason"] == "length" and len(out["token_ids"]) == 16 - 2


def test_bad_model_dirs(tmp_path, text_model):
    with pytest.raises(ValueError, match="not a directory"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(text_model, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(corrupt), device="cpu")
    with pytest.raises(TypeError, match="unknown config key"):
        LLM(str(text_model), max_num_seq=3)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(str(text_model), max_num_seqs=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(str(text_model), gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="pdl_max_batch_size must be >= 0"):
        LLM(str(text_model), pdl_max_batch_size=-1)
    with pytest.raises(TypeError, match="pdl_max_batch_size must be an int"):
        LLM(str(text_model), pdl_max_batch_size="64")
    with pytest.raises(ValueError, match="max_logprobs must be >= 0"):
        LLM(str(text_model), max_logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs_chunk must be >= 1"):
        LLM(str(text_model), prompt_logprobs_chunk=0)
    with pytest.raises(TypeError, match="fused_sampler must be a bool or None"):
        LLM(str(text_model), fused_sampler="yes")
    with LLM(str(text_model), device="cpu", pdl_max_batch_size=0) as llm:  # 0: PDL off
        assert len(llm.generate(["ok"], SamplingParams(max_tokens=2), use_tqdm=False)) == 1
    with LLM(str(text_model), device="cpu") as llm:  # a valid one still works
        assert len(llm.generate(["ok"], SamplingParams(max_tokens=2), use_tqdm=False)) == 1


def test_max_tokens_none_runs_to_the_model_length(text_model):
    # vLLM's meaning of max_tokens=None: as many tokens as max_model_len leaves the prompt
    with LLM(str(text_model), device="cpu", max_model_len=40, kvcache_block_size=4) as llm:
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=None, min_tokens=3)
        outs = llm.generate([[5] * 10, [6] * 37], params, use_tqdm=False)
        assert [len(o["token_ids"]) for o in outs] == [30, 3]
        assert {o["finish_reason"] for o in outs} == {"length"}
    assert params.max_tokens is None  # the caller's params are left as given


def test_results_read_as_dicts_and_as_vllm_outputs(llm):
    # Nano-vLLM's code indexes the result dicts; vLLM's reads RequestOutput's attributes
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=4, n=2)
    (out,) = llm.generate(["Hello"], params, use_tqdm=False)
    assert isinstance(out, dict) and out.finished and out["finished"]
    assert [c.index for c in out.outputs] == [0, 1]
    assert (
        out.outputs[0].text == out["text"]
        and out.outputs[1].token_ids == out["outputs"][1]["token_ids"]
    )
    assert out.prompt == "Hello" and out.prompt_token_ids == out["prompt_token_ids"]
    assert out.outputs[0].finish_reason == "length"
    with pytest.raises(AttributeError, match="no field 'nope'"):
        _ = out.nope
    (ids_only,) = llm.generate([out.prompt_token_ids], params, use_tqdm=False)
    assert ids_only.prompt is None and ids_only.outputs[1].text
    assert pickle.loads(pickle.dumps(out)) == out
    assert json.loads(json.dumps(out))["outputs"][1]["index"] == 1


def test_reset_prefix_cache_and_get_tokenizer(llm):
    # vLLM's LLM.reset_prefix_cache(): the next run of a prompt computes it all again
    assert llm.get_tokenizer() is llm.tokenizer is not None
    prompt, params = PROMPTS[0] * 4, SamplingParams(temperature=0, max_tokens=3)
    assert llm.reset_prefix_cache()  # what earlier tests on this engine cached
    runs = [llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2)]
    assert llm.reset_prefix_cache()
    runs.append(llm.generate([prompt], params, use_tqdm=False)[0])
    assert [r.num_cached_tokens > 0 for r in runs] == [False, True, False]
    assert len({tuple(r.token_ids) for r in runs}) == 1
    llm.add_request(prompt, params)
    llm.step()
    assert not llm.reset_prefix_cache()  # a request holds blocks
    while not llm.is_finished():
        llm.step()


def test_vllm_names_for_config_fields(text_model):
    config = Config.of(text_model, block_size=8, num_gpu_blocks_override=12)
    assert (config.kvcache_block_size, config.num_kvcache_blocks) == (8, 12)
    with pytest.raises(TypeError, match="block_size and kvcache_block_size"):
        Config.of(text_model, block_size=8, kvcache_block_size=16)


def test_max_model_len_capped_by_model(text_model):
    with LLM(str(text_model), device="cpu", max_model_len=100_000) as llm:
        assert llm.config.max_model_len == 512


def test_seeded_sampling_survives_preemption(text_model):
    p = [SamplingParams(temperature=0.9, max_tokens=24, seed=s, ignore_eos=True) for s in range(4)]
    with LLM(str(text_model), device="cpu", kvcache_block_size=4) as roomy:
        ref = [o["token_ids"] for o in roomy.generate(PROMPTS, p, use_tqdm=False)]
    with LLM(str(text_model), device="cpu", kvcache_block_size=4, num_kvcache_blocks=16) as tight:
        got = [o["token_ids"] for o in tight.generate(PROMPTS, p, use_tqdm=False)]
        assert tight.scheduler.num_preemptions > 0
    assert got == ref
    assert torch.tensor([len(g) for g in got]).eq(24).all()


def test_numpy_token_ids_accepted(llm):
    import numpy as np

    a = llm.generate(
        [np.array([5, 6, 7]).tolist()], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False
    )[0]["token_ids"]
    b = llm.generate(
        [list(np.array([5, 6, 7]))], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False
    )[0]["token_ids"]
    assert a == b
    with pytest.raises(TypeError, match="must hold ints"):
        llm.generate([[5, 6.0]], use_tqdm=False)


def _mixed_params():
    return [
        SamplingParams(temperature=0.8, max_tokens=20, seed=1),  # may stop at EOS
        SamplingParams(temperature=0.0, max_tokens=9),
        SamplingParams(temperature=1.0, top_k=5, max_tokens=15, seed=2, stop_token_ids=[5, 9]),
        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12, seed=3, stop=["e"]),
    ]


def test_async_and_sync_scheduling_agree(text_model):
    # Overlapped scheduling learns of EOS, stop tokens and stop strings one step late; the
    # outputs must not show it. A tight pool adds preemption with a token in flight.
    runs = []
    for mode in (False, True):
        with LLM(
            str(text_model),
            device="cpu",
            kvcache_block_size=4,
            num_kvcache_blocks=20,
            async_scheduling=mode,
        ) as llm:
            outs = llm.generate(PROMPTS, _mixed_params(), use_tqdm=False)
            runs.append([(o["token_ids"], o["text"], o["finish_reason"]) for o in outs])
            assert llm.scheduler.num_preemptions > 0
            bm = llm.scheduler.block_manager
            assert bm.num_free_blocks == bm.num_blocks
    assert runs[0] == runs[1]
    reasons = {r for _, _, r in runs[0]}
    assert reasons == {"stop", "length"}


def test_abort_while_a_step_is_in_flight(llm):
    assert llm.config.async_scheduling
    keep = llm.add_request("Hello there", SamplingParams(temperature=0, max_tokens=6))
    drop = llm.add_request("The quick", SamplingParams(temperature=0, max_tokens=6))
    llm.step()  # the prefill is queued, its tokens not yet read
    llm.step()
    llm.abort_request(drop)
    done = {}
    while not llm.is_finished():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out
    assert list(done) == [keep]
    ref = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert done[keep].token_ids == ref[0]["token_ids"]


def test_async_scheduling_config(text_model):
    with pytest.raises(TypeError, match="async_scheduling"):
        LLM(str(text_model), device="cpu", async_scheduling="yes")


def test_stop_strings_decode_only_the_tail_each_step(llm, monkeypatch):
    # Decoding the whole output every step would be quadratic in its length.
    from nv_engine.core.detokenizer import IncrementalDetokenizer

    lengths = []
    decode = IncrementalDetokenizer._decode

    def counting_decode(self, ids):
        lengths.append(len(ids))
        return decode(self, ids)

    monkeypatch.setattr(IncrementalDetokenizer, "_decode", counting_decode)
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=["\x00\x00\x00"])
    out = llm.generate([PROMPTS[0]], p, use_tqdm=False)[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 40
    assert len(lengths) >= 2 * 39  # two short decodes per sampled token
    assert max(lengths) <= 5 + 1  # the prompt's last 5 tokens as context, and the new one


def test_vllm_prompt_forms(llm):
    # {"prompt": text}, {"prompt_token_ids": ids} (vLLM's TextPrompt / TokensPrompt), and ids as
    # a numpy array or tensor: all the same request as the plain forms
    import numpy as np

    p = SamplingParams(temperature=0, max_tokens=4)
    ids = llm.tokenizer.encode(PROMPTS[0])
    want = llm.generate([PROMPTS[0]], p, use_tqdm=False)[0]["token_ids"]
    forms = [{"prompt": PROMPTS[0]}, {"prompt_token_ids": ids}, np.array(ids), torch.tensor(ids)]
    outs = llm.generate(forms, p, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == [want] * 4
    assert llm.generate({"prompt_token_ids": ids}, p, use_tqdm=False)[0]["token_ids"] == want
    with pytest.raises(ValueError, match="one of 'prompt'"):
        llm.generate([{"prompt": "a", "prompt_token_ids": [1]}], p, use_tqdm=False)
    with pytest.raises(ValueError, match="one of 'prompt'"):
        llm.generate([{"text": "a"}], p, use_tqdm=False)
    with pytest.raises(TypeError, match="1-D"):
        llm.generate([torch.tensor(3)], p, use_tqdm=False)
    assert llm.is_finished()


def test_model_without_tokenizer_files(tmp_path):
    # transformers builds an empty tokenizer for a bare Qwen3 directory (text -> no tokens, EOS
    # id 0): the engine must treat that as no tokenizer, so token 0 is not taken for EOS and a
    # text prompt gets an error that says what is missing
    save_tiny_qwen3(tmp_path, seed=2)
    with LLM(str(tmp_path), device="cpu", kvcache_block_size=4, num_kvcache_blocks=64) as llm:
        assert llm.tokenizer is None
        assert 0 not in llm.scheduler.eos_token_ids
        with pytest.raises(ValueError, match="no tokenizer"):
            llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)[0]
        assert len(out["token_ids"]) == 3 and out["text"] == ""


def test_min_tokens_matches_hf_min_new_tokens(text_model, tmp_path):
    from transformers import AutoModelForCausalLM

    prompt = PROMPTS[2]
    with LLM(str(text_model), device="cpu", kvcache_block_size=4) as llm:
        ids = llm.tokenizer.encode(prompt)
        base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    first, second = base[0]["token_ids"][:2]
    # The same weights with greedy decoding's first token declared EOS: it would stop at once.
    copy = tmp_path / "m"
    shutil.copytree(text_model, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["eos_token_id"] = first
    (copy / "config.json").write_text(json.dumps(cfg))
    extra = [second] if second != first else []
    p = SamplingParams(temperature=0, max_tokens=12, min_tokens=5, stop_token_ids=extra)
    with LLM(str(copy), device="cpu", kvcache_block_size=4) as llm:
        early = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        late = llm.generate([prompt, PROMPTS[0]], p, use_tqdm=False)[0]
        stops = sorted(llm.scheduler.eos_token_ids | set(extra))  # the config's and tokenizer's
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    hf = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32).eval()
    ref = hf.generate(
        torch.tensor([ids]),
        max_new_tokens=12,
        min_new_tokens=5,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=0,
    )[0, len(ids) :].tolist()
    assert early[0]["token_ids"] == [first] and early[0]["finish_reason"] == "stop"
    assert len(late["token_ids"]) >= 5
    assert not {first, *extra} & set(late["token_ids"][:5])
    assert late["token_ids"] == ref


def test_min_tokens_defers_stop_strings(llm):
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = llm.generate([PROMPTS[3]], p, use_tqdm=False)[0]
    text, toks = base["text"], base["token_ids"]
    assert len(text) == len(toks)  # one character per token (the character tokenizer)
    stop = text[1]
    later = text.find(stop, 5)  # counts once it ends in the 6th token or later
    p.stop, p.min_tokens = [stop], 6
    out = llm.generate([PROMPTS[3]], p, use_tqdm=False)[0]
    if later < 0:  # the stop character never comes back: the output runs to max_tokens
        assert out["finish_reason"] == "length" and out["text"] == text
    else:
        assert out["finish_reason"] == "stop" and out["text"] == text[:later]
        assert out["token_ids"] == toks[: later + 1]


def test_logprobs_match_hf(text_model, llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    prompts = [PROMPTS[0], PROMPTS[3]]
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, logprobs=0, seed=5),
    ]
    outs = llm.generate(prompts + [PROMPTS[1]], params + [SamplingParams(max_tokens=4)], False)
    assert outs[2]["logprobs"] is None and outs[2]["cumulative_logprob"] is None
    for prompt, p, out in zip(prompts, params, outs, strict=False):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():  # the raw distribution at every output position, by teacher forcing
            logits = hf(torch.tensor([ids + out["token_ids"]])).logits[0, len(ids) - 1 : -1]
        ref = logits.log_softmax(-1)
        assert len(out["logprobs"]) == len(out["token_ids"]) == 6
        total = 0.0
        for i, (tok, entry) in enumerate(zip(out["token_ids"], out["logprobs"], strict=True)):
            top = ref[i].topk(p.logprobs)
            assert next(iter(entry)) == tok  # the sampled token first
            assert set(entry) == {tok, *top.indices.tolist()}
            for t, lp in entry.items():
                assert abs(lp - ref[i, t].item()) <= 1e-4
            total += ref[i, tok].item()
        assert abs(out["cumulative_logprob"] - total) <= 1e-3
    greedy = outs[0]["logprobs"]
    assert all(max(e.values()) == e[t] for e, t in zip(greedy, outs[0]["token_ids"], strict=True))


def test_n_completions_per_prompt(llm):
    p = SamplingParams(temperature=1.0, max_tokens=8, seed=7, n=3, logprobs=1)
    outs = llm.generate([PROMPTS[0], PROMPTS[1]], p, use_tqdm=False)
    assert len(outs) == 2
    for prompt, out in zip(PROMPTS, outs, strict=False):
        assert len(out["outputs"]) == 3
        assert out["token_ids"] == out["outputs"][0]["token_ids"]
        for i, c in enumerate(out["outputs"]):
            # the i-th completion is the request seeded with seed + i
            alone = SamplingParams(temperature=1.0, max_tokens=8, seed=7 + i, logprobs=1)
            ref = llm.generate([prompt], alone, use_tqdm=False)[0]
            assert c["token_ids"] == ref["token_ids"] and c["text"] == ref["text"]
            assert c["finish_reason"] == "length"
            for got, want in zip(c["logprobs"], ref["logprobs"], strict=True):
                assert got.keys() == want.keys()  # values differ by the batch's rounding only
                assert all(abs(got[t] - want[t]) <= 1e-4 for t in got)
        assert len({tuple(c["token_ids"]) for c in out["outputs"]}) > 1
    greedy = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=5, n=2), False)[0]
    assert greedy["outputs"][0]["token_ids"] == greedy["outputs"][1]["token_ids"]
    one = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=5), False)[0]
    (only,) = one["outputs"]
    assert only == {"index": 0, **{k: one[k] for k in only if k != "index"}}
    with pytest.raises(ValueError, match="n=1"):
        llm.add_request(PROMPTS[0], SamplingParams(n=2))


class _OpenAIPenalties:
    """A transformers logits processor: frequency and presence penalties on generated tokens."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for t, c in zip(*input_ids[0, self.prompt_len :].unique(return_counts=True), strict=True):
            scores[0, t] -= self.frequency * c + self.presence
        return scores


@pytest.mark.parametrize("async_scheduling,mixed", [(True, False), (False, False), (True, True)])
def test_penalties_match_hf(text_model, async_scheduling, mixed):
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    hf = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    cases = [
        dict(repetition_penalty=1.8),
        dict(frequency_penalty=1.5, presence_penalty=0.5),
        dict(repetition_penalty=0.7, presence_penalty=-1.0),
    ]
    prompts = [PROMPTS[3], PROMPTS[0], PROMPTS[1]]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **c) for c in cases]
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = dict(device="cpu", kvcache_block_size=4, async_scheduling=async_scheduling)
    if mixed:  # penalized decode rows beside prefill chunks, their input token still pending
        kw.update(mix_decode_and_prefill=True, max_num_batched_tokens=6)
    with LLM(str(text_model), **kw) as llm:
        outs = llm.generate(prompts + prompts[:1], params + [plain], use_tqdm=False)
        ids = [llm.tokenizer.encode(p) for p in prompts]
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    assert outs[0]["token_ids"] != outs[3]["token_ids"]  # the penalty changed the output
    for prompt_ids, case, out in zip(ids, cases, outs, strict=False):
        extra = _OpenAIPenalties(
            len(prompt_ids), case.get("frequency_penalty", 0.0), case.get("presence_penalty", 0.0)
        )
        ref = hf.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=16,
            do_sample=False,
            repetition_penalty=case.get("repetition_penalty", 1.0),
            logits_processor=LogitsProcessorList([extra]),
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt_ids) :].tolist()
        assert out["token_ids"] == ref, case


def test_default_sampling_params_from_generation_config(text_model, tmp_path, caplog):
    copy = tmp_path / "m"
    shutil.copytree(text_model, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.6, top_k=20, top_p=0.95, max_new_tokens=7)
    (copy / "generation_config.json").write_text(json.dumps(gen))
    with LLM(str(copy), device="cpu", kvcache_block_size=4) as llm:
        d = llm.get_default_sampling_params()
        assert (d.temperature, d.top_k, d.top_p, d.max_tokens) == (0.6, 20, 0.95, 7)
        assert d.min_p == 0.0 and d.repetition_penalty == 1.0  # not in the file: ours
        out = llm.generate([PROMPTS[0]], use_tqdm=False)[0]
        n = len(out["token_ids"])
        assert n == 7 if out["finish_reason"] == "length" else n < 7  # max_new_tokens=7
        explicit = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3), use_tqdm=False)[0]
        assert len(explicit["token_ids"]) <= 3
    gen["top_p"] = 1.5  # invalid: warned about and ignored
    (copy / "generation_config.json").write_text(json.dumps(gen))
    with LLM(str(copy), device="cpu", kvcache_block_size=4) as llm:
        assert llm.get_default_sampling_params() == SamplingParams()
    assert "sampling defaults" in caplog.text
    with LLM(str(text_model), device="cpu", kvcache_block_size=4) as llm:  # only bos/eos/pad
        assert llm.get_default_sampling_params() == SamplingParams()


@pytest.mark.parametrize("chunk", [8, 4096])
def test_prompt_logprobs_match_hf(text_model, chunk):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    prompt = PROMPTS[3] + " and " + PROMPTS[1]
    p = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2)
    kw = dict(device="cpu", kvcache_block_size=4, max_num_batched_tokens=chunk)
    with LLM(str(text_model), **kw) as llm:
        ids = llm.tokenizer.encode(prompt)
        plain = SamplingParams(temperature=0, max_tokens=3)
        warm = llm.generate([prompt], plain, use_tqdm=False)[0]  # fills the prefix cache
        hit = llm.generate([prompt], plain, use_tqdm=False)[0]
        outs = llm.generate([prompt, PROMPTS[0]], [p, plain], use_tqdm=False)
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    assert hit["num_cached_tokens"] > 0  # a plain request reads the cache ...
    out = outs[0]
    assert out["num_cached_tokens"] == 0  # ... one asking for prompt logprobs computes it all
    assert out["token_ids"] == warm["token_ids"] and outs[1]["prompt_logprobs"] is None
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    got = out["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        entry = got[i]
        assert next(iter(entry)) == ids[i]
        assert set(entry) == {ids[i], *ref[i - 1].topk(2).indices.tolist()}
        assert all(abs(v - ref[i - 1, t].item()) <= 1e-4 for t, v in entry.items())


def test_include_stop_str_and_special_tokens_in_text(llm):
    greedy = dict(temperature=0, max_tokens=30, ignore_eos=True)
    base = llm.generate([PROMPTS[3]], SamplingParams(**greedy), use_tqdm=False)[0]["text"]
    stop = base[5:7]
    cut = base.find(stop)
    p = SamplingParams(**greedy, stop=[stop], include_stop_str_in_output=True)
    out = llm.generate([PROMPTS[3]], p, use_tqdm=False)[0]
    assert out["finish_reason"] == "stop" and out["text"] == base[: cut + len(stop)]
    # "Hello there" greedily emits <|im_end|>, a special token: in the text only if asked
    tok = llm.tokenizer
    special = tok.convert_tokens_to_ids("<|im_end|>")
    kept = llm.generate(
        [PROMPTS[0]], SamplingParams(**greedy, skip_special_tokens=False), use_tqdm=False
    )[0]
    dropped = llm.generate([PROMPTS[0]], SamplingParams(**greedy), use_tqdm=False)[0]
    assert special in kept["token_ids"] and kept["token_ids"] == dropped["token_ids"]
    assert "<|im_end|>" in kept["text"] and "<|im_end|>" not in dropped["text"]
    assert kept["text"] == tok.decode(kept["token_ids"], skip_special_tokens=False)


def test_every_sampling_feature_in_bfloat16(text_model):
    # the GPU's dtype: logits processors and logprobs must take bf16 logits
    p = SamplingParams(
        temperature=0.7,
        seed=1,
        max_tokens=8,
        min_tokens=4,
        top_k=20,
        logprobs=2,
        prompt_logprobs=1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        n=2,
    )
    kw = dict(device="cpu", dtype="bfloat16", kvcache_block_size=4)
    with LLM(str(text_model), **kw) as llm:
        assert llm.model_runner.dtype == torch.bfloat16
        outs = llm.generate(PROMPTS, p, use_tqdm=False)
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert len(out["outputs"]) == 2
        for c in out["outputs"]:
            assert 4 <= len(c["token_ids"]) == len(c["logprobs"]) <= 8
            assert all(lp <= 0 for e in c["logprobs"] for lp in e.values())
        assert len(out["prompt_logprobs"]) == len(llm.tokenizer.encode(prompt))


def test_logprobs_above_max_logprobs_rejected_and_chunked_prompt_logprobs(text_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    kw = dict(device="cpu", kvcache_block_size=4, max_logprobs=3, prompt_logprobs_chunk=5)
    with LLM(str(text_model), **kw) as llm:
        for name in ("logprobs", "prompt_logprobs"):
            with pytest.raises(ValueError, match=f"{name}=4 is more than max_logprobs=3"):
                llm.generate(["a"], SamplingParams(max_tokens=2, **{name: 4}), use_tqdm=False)
        p = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
        out = llm.generate([PROMPTS[3]], p, use_tqdm=False)[0]  # projected 5 positions at a time
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    ids = out["prompt_token_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    got = out["prompt_logprobs"]
    assert len(got) == len(ids) > 5 * 3
    for i in range(1, len(ids)):
        assert set(got[i]) == {ids[i], *ref[i - 1].topk(3).indices.tolist()}
        assert abs(got[i][ids[i]] - ref[i - 1, ids[i]].item()) <= 1e-4


def test_generate_returns_with_the_engine_idle(llm):
    # a stop token ends the request while the next step (overlapped scheduling) is queued
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    stop = base[0]["token_ids"][2]
    out = llm.generate(
        [PROMPTS[0]],
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]),
        use_tqdm=False,
    )
    assert out[0]["finish_reason"] == "stop"
    assert llm.is_finished()
