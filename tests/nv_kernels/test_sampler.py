from __future__ import annotations

import math

import pytest
import torch

from nv_kernels import SamplingTensors, sample
from nv_kernels.sampler import (
    apply_penalties,
    chunked_argmax,
    exponential_from_bits,
    exponential_noise,
    uniform_from_bits,
    vocab_keys,
)


def _st(n, temperature=1.0, top_k=None, top_p=None, min_p=None, seeds=None, steps=None, v=0):
    t = torch.full((n,), temperature) if not torch.is_tensor(temperature) else temperature
    return SamplingTensors(
        temperatures=t,
        top_k=torch.full((n,), top_k or v, dtype=torch.int64),
        top_p=torch.full((n,), top_p or 1.0),
        min_p=torch.full((n,), min_p or 0.0),
        seeds=seeds if seeds is not None else torch.arange(n, dtype=torch.int64),
        steps=steps if steps is not None else torch.zeros(n, dtype=torch.int64),
        all_greedy=bool((t == 0).all()),
        use_top_k=top_k is not None,
        use_top_p=top_p is not None,
        use_min_p=min_p is not None,
    )


def test_greedy_is_argmax():
    logits = torch.randn(16, 300)
    assert torch.equal(sample(logits, _st(16, 0.0, v=300)), logits.argmax(-1))
    # Mixed batch: greedy rows stay argmax whatever the others do.
    temps = torch.tensor([0.0, 1.0] * 8)
    out = sample(logits, _st(16, temps, top_k=5, v=300))
    assert torch.equal(out[::2], logits.argmax(-1)[::2])


def test_seeded_draws_ignore_batch_composition():
    logits = torch.randn(1, 50)
    seed, step = torch.tensor([1234]), torch.tensor([7])
    alone = sample(logits, _st(1, 0.8, seeds=seed, steps=step, v=50))
    big = torch.cat([torch.randn(5, 50), logits, torch.randn(3, 50)])
    seeds = torch.tensor([1, 2, 3, 4, 5, 1234, 9, 9, 9])
    steps = torch.tensor([0, 0, 0, 0, 0, 7, 1, 2, 3])
    assert sample(big, _st(9, 0.8, seeds=seeds, steps=steps, v=50))[5] == alone[0]
    draws = [
        sample(logits, _st(1, 0.8, seeds=seed, steps=torch.tensor([s]), v=50)).item()
        for s in range(40)
    ]
    assert len(set(draws)) > 1  # the step moves the draw


def test_uniform_is_open_interval():
    # the extreme hash values must not give u = 1 (noise 0: an infinite score) or u = 0
    u = uniform_from_bits(torch.tensor([0, 1, 511, 512, 0xFFFFFFFE, 0xFFFFFFFF]))
    assert (u > 0).all() and (u < 1).all()
    assert (-torch.log(u) > 0).all() and torch.isfinite(torch.log(-torch.log(u))).all()
    assert u[0] == u[2] < u[3]  # the top 23 bits, each bucket at its centre


def test_noise_is_exponential():
    e2 = exponential_noise(torch.tensor([5, 6]), torch.tensor([0, 0]), vocab_keys(200_000, "cpu"))
    assert e2.min() > 0
    e = e2.double() * math.log(2)  # base-2 units to Exp(1)
    assert abs(e.mean().item() - 1) < 0.01 and abs(e.var().item() - 1) < 0.03
    assert not torch.equal(e[0], e[1])


def test_noise_near_u_one_is_accurate():
    """-ln(u) for u next to 1 (the series branch) and elsewhere, against float64."""
    bits = torch.tensor([0xFFFFFFFF, 0xFFFFFE00, 0xFF000000, 0xFC000000, 0xF0000000, 0x1000, 0])
    u = uniform_from_bits(bits).double()
    want = -torch.log(u) * (1 / math.log(2))
    got = exponential_from_bits(bits).double()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)  # float32: 6e-8


def _frequencies(logits_row, n, **kw):
    v = logits_row.numel()
    logits = logits_row.expand(n, v)
    st = _st(n, seeds=torch.arange(n, dtype=torch.int64) * 7919 + 3, v=v, **kw)
    return torch.bincount(sample(logits, st), minlength=v).double() / n


def _expected(logits_row, temperature, top_k=None, top_p=None, min_p=None):
    p = torch.softmax(logits_row.double() / temperature, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if min_p is not None:
        keep &= p >= min_p * p.max()
    p = torch.where(keep, p, 0)
    p = p / p.sum()
    order = p.argsort(descending=True)
    if top_k is not None:
        keep[order[top_k:]] = False
    p = torch.where(keep, p, 0)
    p = p / p.sum()
    if top_p is not None:
        sorted_p = p[order]
        before = sorted_p.cumsum(0) - sorted_p  # mass strictly more likely than each token
        drop = order[before >= top_p]
        keep[drop] = False
    p = torch.where(keep, p, 0)
    return p / p.sum()


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(top_k=4), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=6, top_p=0.8)],
    ids=["plain", "top_k", "top_p", "min_p", "top_k+top_p"],
)
def test_frequencies_match_restricted_softmax(kw):
    # Logits with distinct gaps so that no token sits on a filter's boundary.
    logits_row = torch.tensor([2.0, 1.6, 1.1, 0.9, 0.3, 0.0, -0.4, -1.0, -1.5, -2.5])
    temperature = 0.9
    n = 40_000
    freq = _frequencies(logits_row, n, temperature=temperature, **kw)
    expected = _expected(logits_row, temperature, **kw)
    assert torch.equal(freq > 0, expected > 0), "a filtered token was drawn, or a kept one never"
    # Pearson chi-square over kept tokens; df <= 9, so 35 is far beyond the 0.9999 quantile (~33.7
    # at df=9): a correct sampler fails this about once in 10^4 runs, a wrong filter always.
    kept = expected > 0
    chi2 = (((freq[kept] - expected[kept]) * n) ** 2 / (expected[kept] * n)).sum().item()
    assert chi2 < 35, (chi2, freq, expected)


def test_compiled_sampler_matches_eager_in_one_graph():
    """The compiled sampler draws what the eager one draws, and compiles one graph for every
    batch: any mix of filters, one row or many, bf16 or float32 logits (each new graph would
    be seconds of compiling in the middle of serving)."""
    from torch._dynamo.utils import counters

    from nv_kernels import Sampler

    v = 300
    eager, compiled = Sampler("cpu", compile=False), Sampler("cpu", compile=True)
    g = torch.Generator().manual_seed(0)
    temps = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 0.9])
    batches = [
        (6, dict(top_k=20, top_p=0.9, min_p=0.05), torch.float32),  # compiles here
        (6, dict(top_p=0.8), torch.bfloat16),
        (4, dict(top_k=3), torch.float32),
        (1, dict(min_p=0.2), torch.float32),
        (1, dict(top_k=5, top_p=0.5), torch.bfloat16),
        (5, dict(top_k=v), torch.float32),
    ]
    graphs = None
    for rows, filters, dtype in batches:
        logits = (torch.randn(rows, v, generator=g) * 3).to(dtype)
        st = _st(rows, temps[:rows] if rows > 1 else temps[1:2], v=v, **filters)
        assert torch.equal(compiled(logits, st), eager(logits, st)), (rows, filters, dtype)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs, (rows, filters, dtype)


@pytest.mark.parametrize("vocab", [1, 63, 64, 65, 1000])
def test_chunked_argmax_is_argmax_with_first_index_on_ties(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(0, 4, (7, vocab), generator=g).float()  # many ties
    x[0] = 0.0  # one row all tied: index 0
    x[1, -1] = 10.0  # the maximum in the padded last chunk
    assert torch.equal(chunked_argmax(x), x.argmax(dim=-1))
    assert chunked_argmax(x)[0] == 0


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the NaN row, on purpose
@pytest.mark.parametrize("vocab", [300, 5000])
def test_fused_sampler_kernel_draws_what_sample_draws(vocab):
    """The Triton kernels (interpreted) and the torch `sample` share the noise function, so
    they pick the same tokens: greedy, sampled and mixed rows, negative and huge seeds."""
    from nv_kernels.sample_kernel import fused_sample

    g = torch.Generator().manual_seed(vocab)
    n = 12
    logits = torch.randn(n, vocab, generator=g) * 3
    temps = torch.tensor([0.0, 0.7, 1.0, 1.5, 0.0, 0.3] * 2)
    seeds = torch.tensor([1, 2, 3, -5, 7, 2**62, 0, -(2**63), 11, 12, 13, 14])
    steps = torch.arange(n, dtype=torch.int64) * 37
    want = sample(logits, _st(n, temps, seeds=seeds, steps=steps, v=vocab))
    assert torch.equal(fused_sample(logits, temps, seeds, steps), want)
    assert torch.equal(fused_sample(logits), logits.argmax(-1))
    # ties go to the lowest index, across chunks too
    flat = torch.zeros(2, vocab)
    assert fused_sample(flat).tolist() == [0, 0]
    # a row of NaN (a broken model) still yields a token id the engine can embed
    broken = torch.full((2, vocab), float("nan"))
    assert all(0 <= t < vocab for t in fused_sample(broken, temps[:2], seeds[:2], steps[:2]))


@pytest.mark.parametrize("parts", [2, 4])
def test_fused_sampler_from_vocabulary_shards_draws_what_the_whole_draws(parts):
    """Tensor parallelism's draw: each shard's chunk candidates (token ids offset by the shard's
    start), stacked, pick the same tokens as the whole vocabulary: greedy and sampled rows,
    and ties across shards go to the lowest token id."""
    from nv_kernels.sample_kernel import chunk_candidates, fused_sample, pick_candidates

    vocab, n = 4800, 6
    g = torch.Generator().manual_seed(parts)
    logits = torch.randn(n, vocab, generator=g) * 3
    temps = torch.tensor([0.0, 0.7, 1.0, 1.5, 0.0, 0.3])
    seeds = torch.tensor([1, 2, 3, -5, 7, 2**62])
    steps = torch.arange(n, dtype=torch.int64) * 37
    w = vocab // parts

    def sharded(x, *draw):
        shards = [x[:, r * w : (r + 1) * w].contiguous() for r in range(parts)]
        cands = [chunk_candidates(s, *draw, vocab_offset=r * w) for r, s in enumerate(shards)]
        return pick_candidates(torch.stack(cands))

    want = fused_sample(logits, temps, seeds, steps)
    assert torch.equal(sharded(logits, temps, seeds, steps), want)
    assert torch.equal(want, sample(logits, _st(n, temps, seeds=seeds, steps=steps, v=vocab)))
    assert torch.equal(sharded(logits), logits.argmax(-1))
    tie = torch.zeros(2, vocab)
    tie[:, w + 3] = tie[:, -1] = 1.0  # the same best in two shards
    assert sharded(tie).tolist() == [w + 3, w + 3]


def test_sampler_routes_filters_to_torch_and_the_rest_to_the_kernel(monkeypatch):
    from nv_kernels import Sampler
    from nv_kernels import sampler as sampler_mod

    calls = []
    kernel = sampler_mod.fused_sample
    monkeypatch.setattr(sampler_mod, "fused_sample", lambda *a: calls.append(1) or kernel(*a))
    logits = torch.randn(4, 300)
    fused = Sampler("cpu", compile=False, fused=True)
    plain = Sampler("cpu", compile=False, fused=False)
    for st, takes_kernel in (
        (_st(4, 0.9, v=300), True),
        (_st(4, 0.0, v=300), True),
        (None, True),
        (_st(4, 0.9, top_k=3, v=300), False),
        (_st(4, 0.9, top_p=0.5, v=300), False),
        (_st(4, 0.9, min_p=0.1, v=300), False),
    ):
        calls.clear()
        assert torch.equal(fused(logits, st), plain(logits, st))
        assert bool(calls) == takes_kernel
    calls.clear()
    plain(logits, None)
    assert not calls


def test_apply_penalties_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    b, v = 3, 11
    logits = torch.randn(b, v, generator=g) * 3
    prompts = [[1, 2, 2], [], [5]]
    outputs = [[2, 3, 3, 3], [7, 7], []]
    rep, freq, pres = [1.5, 1.0, 0.5], [0.5, -1.0, 2.0], [1.0, 0.25, -0.5]
    ref = logits.clone()
    for i in range(b):
        for t in set(prompts[i]) | set(outputs[i]):
            x = ref[i, t]
            ref[i, t] = x / rep[i] if x > 0 else x * rep[i]
        for t in set(outputs[i]):
            ref[i, t] -= freq[i] * outputs[i].count(t) + pres[i]
    in_prompt = torch.zeros(b, v, dtype=torch.bool)
    counts = torch.zeros(b, v)
    for i in range(b):
        in_prompt[i, prompts[i]] = True
        for t in outputs[i]:
            counts[i, t] += 1
    out = apply_penalties(
        logits, in_prompt, counts, torch.tensor(rep), torch.tensor(freq), torch.tensor(pres)
    )
    torch.testing.assert_close(out, ref)
    neutral = apply_penalties(logits, in_prompt, counts, *torch.tensor([[1.0, 0, 0]] * b).T)
    assert torch.equal(neutral, logits)


def _sharded_rank(rank: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from nv_kernels import Sampler

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        logits, st = _sharded_case()
        w = logits.shape[1] // 2
        shard = logits[:, rank * w : (rank + 1) * w].contiguous()
        sampler = Sampler("cpu", compile=False, fused=True)

        def gather(x: torch.Tensor) -> torch.Tensor:  # TPGroup.gather_ranks' contract
            parts = [torch.empty_like(x) for _ in range(2)]
            dist.all_gather(parts, x)
            return torch.stack(parts)

        for name, s in (("sampled", st), ("greedy", None)):
            tokens = sampler.sample_sharded(shard, s, rank * w, gather)
            torch.save(tokens, f"{out_dir}/{name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sharded_case():
    n, vocab = 5, 2400
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(3)) * 3
    temps = torch.tensor([0.0, 0.7, 1.0, 1.5, 0.3])
    st = _st(n, temps, seeds=torch.arange(n, dtype=torch.int64) * 11, v=vocab)
    return logits, st


@pytest.mark.slow
def test_sample_sharded_over_two_ranks_draws_what_one_rank_draws(tmp_path):
    """Tensor parallelism's sampler over a real group (gloo, 2 processes): each rank draws from
    its half of the vocabulary, and both get the tokens one rank draws from the whole."""
    import torch.multiprocessing as mp

    from nv_kernels import Sampler

    mp.spawn(_sharded_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    logits, st = _sharded_case()
    one = Sampler("cpu", compile=False, fused=True)
    for name, s in (("sampled", st), ("greedy", None)):
        want = one(logits, s)
        for rank in (0, 1):
            assert torch.equal(torch.load(tmp_path / f"{name}-{rank}.pt"), want), (name, rank)
    with pytest.raises(ValueError, match="top-k"):
        one.sample_sharded(logits, _st(5, 1.0, top_k=3, v=2400), 0, lambda x: x[None])
