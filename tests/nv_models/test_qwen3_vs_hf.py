"""Our Qwen3 against Hugging Face transformers, float32 on CPU."""

from __future__ import annotations

import pytest
import torch
from nv_testing import PagedHarness, hf_logits, load_ours, save_tiny_qwen3

from nv_kernels import AttentionMetadata

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    hf = save_tiny_qwen3(path, seed=0)
    return path, hf


def _prompts(seed: int, lens: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lens]


def test_packed_varlen_prefill_logits(tiny):
    path, hf = tiny
    ours = load_ours(path)
    prompts = _prompts(1, [5, 11, 3, 17])
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.tensor([i for p in prompts for i in range(len(p))])
    cu = torch.tensor(
        [0, *torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()], dtype=torch.int32
    )
    meta = AttentionMetadata(True, torch.full((len(ids),), -1), None, None, cu, cu, 17, 17)
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, pos, meta))
    for i, p in enumerate(prompts):
        ref = hf_logits(hf, p)
        got = logits[cu[i] : cu[i + 1]]
        assert (got - ref).abs().max().item() <= ATOL


def test_greedy_tokens_vary(tiny):
    """The tiny model must be discriminating: greedy continuations are not a copy of the input."""
    _, hf = tiny
    out = hf.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=16, do_sample=False)[0, 4:]
    assert len(set(out.tolist())) >= 4
    assert (out != 8).any()


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-fused"])
def test_prefill_then_decode_through_paged_cache(tiny, backend, monkeypatch):
    """`triton-fused`: the CUDA layer path, interpreted on CPU: every linear layer in the skinny
    GEMM (SiluAndMul in gate_up's epilogue), q/k norm + rotary + KV store in one kernel and
    attention told the cache is written."""
    import nv_models.layers.attention as attention
    import nv_models.layers.linear as linear

    path, hf = tiny
    fused_calls = []
    if backend == "triton-fused":
        fused = attention.qk_norm_rope_store
        monkeypatch.setattr(
            attention, "use_qk_norm_rope_store", lambda qkv, cache, d: cache.numel() > 0
        )
        monkeypatch.setattr(
            attention, "qk_norm_rope_store", lambda *a: fused_calls.append(1) or fused(*a)
        )
        monkeypatch.setattr(linear, "use_skinny_gemm", lambda x, w: True)
        gemm = linear.skinny_gemm
        monkeypatch.setattr(
            linear,
            "skinny_gemm",
            lambda *a, **k: fused_calls.append(("gemm", k.get("gated"))) or gemm(*a, **k),
        )
        backend = "triton"
    ours = load_ours(path, backend)
    harness = PagedHarness(ours, num_blocks=64, block_size=4)
    prompts = _prompts(2, [6, 9])
    steps = 16 if backend == "torch" else 6
    refs = []
    for p in prompts:
        out = hf.generate(
            torch.tensor([p]),
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        refs.append((out.sequences[0, len(p) :].tolist(), torch.stack(out.logits)[:, 0]))
    for i, p in enumerate(prompts):
        harness.add(f"s{i}", p)
    logits = harness.prefill({f"s{i}": len(p) for i, p in enumerate(prompts)})
    last = torch.tensor([len(prompts[0]) - 1, len(prompts[0]) + len(prompts[1]) - 1])
    for i in range(2):
        assert (logits[last[i]] - refs[i][1][0]).abs().max().item() <= ATOL
    for step in range(1, steps):
        logits = harness.decode({f"s{i}": refs[i][0][step - 1] for i in range(2)})
        for i in range(2):
            assert (logits[i] - refs[i][1][step]).abs().max().item() <= ATOL, (step, i)
            assert logits[i].argmax().item() == refs[i][0][step]
    if fused_calls:  # per layer per forward: rope+store, 4 GEMMs (gate_up gated)
        assert len(fused_calls) == 5 * steps * len(ours.model.layers)
        assert fused_calls.count(("gemm", True)) == steps * len(ours.model.layers)


def test_prefix_hit_and_chunked_prefill(tiny):
    path, hf = tiny
    ours = load_ours(path)
    harness = PagedHarness(ours, num_blocks=64, block_size=4)
    a, tail = _prompts(3, [12, 5])
    b = a[:10] + tail  # shares 2 full blocks (8 tokens) with a
    harness.add("a", a)
    harness.prefill({"a": len(a)})
    assert harness.add("b", b) == 8  # prefix hit: 8 tokens served from a's blocks
    assert harness.bm.block_table("b")[:2] == harness.bm.block_table("a")[:2]
    logits_b = harness.prefill({"b": len(b) - 8})
    assert (logits_b - hf_logits(hf, b)[8:]).abs().max().item() <= ATOL
    # The same prompt prefilled in two chunks (7 then the rest), without caching.
    c = _prompts(4, [19])[0]
    harness2 = PagedHarness(ours, num_blocks=64, block_size=4, prefix_caching=False)
    harness2.add("c", c)
    first = harness2.prefill({"c": 7})
    second = harness2.prefill({"c": len(c) - 7})
    ref = hf_logits(hf, c)
    assert (torch.cat([first, second]) - ref).abs().max().item() <= ATOL


def test_tied_model_loads_and_matches(tmp_path):
    hf = save_tiny_qwen3(tmp_path, seed=5, tie_word_embeddings=True)
    ours = load_ours(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    p = _prompts(5, [9])[0]
    cu = torch.tensor([0, 9], dtype=torch.int32)
    meta = AttentionMetadata(True, torch.full((9,), -1), None, None, cu, cu, 9, 9)
    with torch.no_grad():
        logits = ours.compute_logits(ours(torch.tensor(p), torch.arange(9), meta))
    assert (logits - hf_logits(hf, p)).abs().max().item() <= ATOL
