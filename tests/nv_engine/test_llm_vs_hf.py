"""End to end on CPU: greedy tokens equal Hugging Face `generate`, in every scheduling setting."""

from __future__ import annotations

import pytest
import torch
from nv_testing import hf_greedy, save_tiny_qwen3, shared_prefix_prompts

from nv_engine import LLM, SamplingParams
from nv_kernels import skinny_variant_rows

EOS = 2
LENS = [3, 9, 17, 30, 5, 41]
MAX_NEW = [24, 16, 20, 12, 32, 18]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3")
    hf = save_tiny_qwen3(path, seed=7)
    prompts = shared_prefix_prompts(LENS)
    refs = hf_greedy(hf, prompts, MAX_NEW, EOS)
    assert sum(len(set(r)) for r in refs) > 3 * len(refs)  # discriminating outputs
    return path, prompts, refs


def assert_pool_whole(llm: LLM) -> None:
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def run_greedy(model_dir, **config):
    path, prompts, refs = model_dir
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in MAX_NEW]
    with LLM(str(path), device="cpu", **config) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        got = [o["token_ids"] for o in outs]
        for g, r in zip(got, refs, strict=True):
            assert g == r
        for o, r, n in zip(outs, refs, MAX_NEW, strict=True):
            assert o["finish_reason"] == ("stop" if r[-1] == EOS else "length")
            assert len(o["token_ids"]) <= n
        assert_pool_whole(llm)
        return llm


OVERLAP = pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])


@OVERLAP
def test_default(model_dir, async_scheduling):
    run_greedy(model_dir, async_scheduling=async_scheduling)


@OVERLAP
def test_tiny_cache_forces_preemption(model_dir, async_scheduling):
    llm = run_greedy(
        model_dir, kvcache_block_size=4, num_kvcache_blocks=24, async_scheduling=async_scheduling
    )
    assert llm.scheduler.num_preemptions > 0


@OVERLAP
def test_chunked_prefill(model_dir, async_scheduling):
    run_greedy(
        model_dir, max_num_batched_tokens=7, kvcache_block_size=4, async_scheduling=async_scheduling
    )


@OVERLAP
@pytest.mark.parametrize(
    "config",
    [
        dict(max_num_batched_tokens=12, kvcache_block_size=4),  # decode rows beside chunks
        dict(max_num_batched_tokens=12, kvcache_block_size=4, num_kvcache_blocks=24),  # preempt
        dict(max_num_batched_tokens=40, kvcache_block_size=4, max_num_seqs=3),  # prefix hits
    ],
    ids=["chunked", "preempt", "prefix"],
)
def test_mixed_decode_and_prefill_steps(model_dir, async_scheduling, config):
    path, prompts, refs = model_dir
    plans = []
    with LLM(
        str(path),
        device="cpu",
        mix_decode_and_prefill=True,
        async_scheduling=async_scheduling,
        **config,
    ) as llm:
        schedule = llm.scheduler.schedule

        def recording():
            plans.append(schedule())
            return plans[-1]

        llm.scheduler.schedule = recording
        params = [SamplingParams(temperature=0.0, max_tokens=n) for n in MAX_NEW]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == refs
        assert_pool_whole(llm)
    plans = [p for p in plans if p is not None]
    # some step ran decode tokens (one token, sampled, after the prompt) beside a prefill chunk
    assert any(
        p.is_prefill
        and any(len(s.token_ids) == 1 and s.start_pos >= 1 and s.sample for s in p.seqs)
        and any(len(s.token_ids) > 1 for s in p.seqs)
        for p in plans
    )
    assert all(p.num_tokens <= config["max_num_batched_tokens"] for p in plans)


@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_block_sizes(model_dir, block_size):
    run_greedy(model_dir, kvcache_block_size=block_size)


@OVERLAP
def test_prefix_caching_hits(model_dir, async_scheduling):
    llm = run_greedy(
        model_dir, kvcache_block_size=4, max_num_seqs=2, async_scheduling=async_scheduling
    )
    stats = llm.scheduler.block_manager.stats()
    assert stats.prefix_cache_hits > 0


def test_prefix_caching_off(model_dir):
    llm = run_greedy(model_dir, kvcache_block_size=4, enable_prefix_caching=False)
    assert llm.scheduler.block_manager.stats().prefix_cache_hits == 0


def test_max_num_seqs_one(model_dir):
    run_greedy(model_dir, max_num_seqs=1, kvcache_block_size=8)


@pytest.mark.slow
@OVERLAP
def test_tensor_parallel_2_gloo(model_dir, async_scheduling):
    llm = run_greedy(
        model_dir, tensor_parallel_size=2, kvcache_block_size=8, async_scheduling=async_scheduling
    )
    assert llm.model_runner is None  # closed: the workers are gone too


@pytest.mark.slow
def test_tensor_parallel_2_overlapped_through_preemption_and_mixed_steps(model_dir):
    # the workers take pending decode tokens from rank 0's broadcast, also in mixed steps and
    # after a preempted request comes back
    llm = run_greedy(
        model_dir,
        tensor_parallel_size=2,
        kvcache_block_size=4,
        num_kvcache_blocks=24,
        max_num_batched_tokens=16,
        mix_decode_and_prefill=True,
        async_scheduling=True,
    )
    assert llm.scheduler.num_preemptions > 0


@pytest.mark.slow
def test_tensor_parallel_2_samples_from_vocabulary_shards(model_dir):
    """The sampler's kernels (interpreted on CPU, as on CUDA by default): at TP=2 a plain batch
    is drawn by every rank from its own vocabulary shard, the logits never gathered. Greedy
    tokens equal transformers' through preemption and mixed steps (the workers take pending
    tokens from their own draw); seeded draws equal TP=1's, also when a request with logprobs
    (gathered logits, rank 0 samples) shares the steps."""
    path, prompts, refs = model_dir
    kw = dict(device="cpu", fused_sampler=True, kvcache_block_size=4, max_num_batched_tokens=16)
    greedy = [SamplingParams(temperature=0.0, max_tokens=n) for n in MAX_NEW]
    tight = dict(num_kvcache_blocks=24, mix_decode_and_prefill=True, async_scheduling=True)
    with LLM(str(path), tensor_parallel_size=2, **kw, **tight) as llm:
        sampler = llm.model_runner.sampler
        draws = []
        sharded = sampler.sample_sharded
        sampler.sample_sharded = lambda *a: draws.append(1) or sharded(*a)
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == refs
        assert draws and llm.scheduler.num_preemptions > 0
        assert_pool_whole(llm)
    seeded = [SamplingParams(temperature=0.9, seed=i, max_tokens=6) for i in range(3)]
    seeded.append(SamplingParams(temperature=0.9, seed=3, max_tokens=6, logprobs=1))
    tokens = []
    for tp in (1, 2):
        with LLM(str(path), tensor_parallel_size=tp, **kw) as llm:
            outs = llm.generate(prompts[:4], seeded, use_tqdm=False)
            tokens.append([o["token_ids"] for o in outs])
            assert_pool_whole(llm)
    assert tokens[0] == tokens[1]


@pytest.mark.slow
def test_tensor_parallel_2_logprobs_and_penalties(model_dir):
    # prompt logprobs make every rank join extra LM-head gathers; penalties ride in the plan
    path, prompts, _ = model_dir
    params = SamplingParams(
        temperature=0.0, max_tokens=6, logprobs=2, prompt_logprobs=1, repetition_penalty=1.3
    )
    outs = []
    for tp in (1, 2):
        kw = dict(device="cpu", tensor_parallel_size=tp, max_num_batched_tokens=16)
        with LLM(str(path), **kw) as llm:
            outs.append(llm.generate(prompts[:3], params, use_tqdm=False))
            assert_pool_whole(llm)
    for one, two in zip(*outs, strict=True):
        assert one["token_ids"] == two["token_ids"]
        assert len(two["prompt_logprobs"]) == len(one["prompt_logprobs"])
        pairs = zip(
            one["prompt_logprobs"][1:] + one["logprobs"],
            two["prompt_logprobs"][1:] + two["logprobs"],
            strict=True,
        )
        for a, b in pairs:
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) <= 1e-4 for t in a)


def test_triton_backend_interpreted(model_dir):
    path, prompts, refs = model_dir
    params = [SamplingParams(temperature=0.0, max_tokens=4) for _ in prompts[:3]]
    with LLM(str(path), device="cpu", attention_backend="triton", kvcache_block_size=4) as llm:
        outs = llm.generate(prompts[:3], params, use_tqdm=False)
        for o, r in zip(outs, refs, strict=False):
            assert o["token_ids"] == r[:4]
        assert_pool_whole(llm)


class _Replay:
    """A CUDA graph stand-in for the CPU: replay() runs the forward it was "captured" with
    (on DecodeGraphs' static buffers) and writes its logits where the graph's live."""

    def __init__(self, forward, logits):
        self.forward, self.logits = forward, logits

    def replay(self):
        self.logits.copy_(self.forward())

    def reset(self):
        pass


def test_decode_with_a_shared_prefix_takes_the_cascade_graphs(model_dir, monkeypatch):
    # requests that share a cached prefix (a system prompt) decode in DecodeGraphs' cascade
    # twins, their prefix's length, blocks and rows copied into the graphs' input buffers by
    # replay(); one request does not share it. Graphs are CUDA's: here each "graph" replays
    # its forward on the same buffers (the Triton kernels interpreted). Still transformers'
    # greedy tokens. On the GPU: test_engine_with_a_shared_prefix_takes_the_cascade_graphs
    import transformers

    import nv_kernels.triton_attention as attention
    from nv_engine.worker import model_runner
    from nv_engine.worker.cuda_graphs import DecodeGraphs

    def capture(self, max_blocks_per_seq):
        self._allocate_inputs(max_blocks_per_seq)
        for b in self.sizes:
            for cascade in (False, True) if b in self.cascade_sizes else (False,):
                forward = lambda b=b, c=cascade: self._forward(b, c)
                logits = forward()
                self.graphs[b, cascade] = (_Replay(forward, logits), logits)

    monkeypatch.setattr(DecodeGraphs, "capture", capture)
    build = model_runner.ModelRunner.__init__

    def with_graphs(self, *args, **kwargs):  # the runner builds graphs on CUDA only
        build(self, *args, **kwargs)
        self.graphs = DecodeGraphs(self.model, self.device, self.config, cascade=True)
        self.graphs.capture(self.max_blocks_per_seq)

    monkeypatch.setattr(model_runner.ModelRunner, "__init__", with_graphs)
    path = model_dir[0]
    g = torch.Generator().manual_seed(5)
    system = torch.randint(3, 512, (13,), generator=g).tolist()
    prompts = [system + torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 4, 6, 9, 2)]
    prompts.append(torch.randint(3, 512, (15,), generator=g).tolist())  # no system prompt
    max_new = [10, 7, 12, 9, 8, 11]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    refs = hf_greedy(hf, prompts, max_new, EOS)
    shared = []
    find = model_runner.ModelRunner._shared_prefix

    def recording(self, plan):
        found = find(self, plan)
        shared.append(None if found is None else (len(found[0]), sum(found[1])))
        return found

    monkeypatch.setattr(model_runner.ModelRunner, "_shared_prefix", recording)
    cascades = []  # what the cascade kernel got from the graph's buffers: (tokens, rows in it)
    cascade = attention._shared_prefix_attention

    def attending(q, k_cache, v_cache, shared, *args):
        cascades.append((shared.length.item(), shared.rows.sum().item()))
        return cascade(q, k_cache, v_cache, shared, *args)

    monkeypatch.setattr(attention, "_shared_prefix_attention", attending)
    kw = dict(device="cpu", attention_backend="triton", kvcache_block_size=4)
    tuning = dict(
        shared_prefix_min_tokens=8, shared_prefix_min_seqs=4, cuda_graph_batch_sizes=(1, 2, 4, 8)
    )
    with LLM(str(path), **kw, **tuning) as llm:
        # the first request fills the prefix cache; the batch's then share its blocks
        llm.generate([system + [7]], SamplingParams(max_tokens=1), use_tqdm=False)
        params = [SamplingParams(temperature=0.0, max_tokens=n) for n in max_new]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o["token_ids"] for o in outs] == refs
        assert_pool_whole(llm)
        # every graph, cascade or not, wrote its logits into the one shared buffer
        graphs = llm.model_runner.graphs
        assert len(graphs.graphs) == 6  # sizes 1, 2, 4, 8 and the twins of 4 and 8
        for (b, _), (_, logits) in graphs.graphs.items():
            assert logits.data_ptr() == graphs.logits.data_ptr() and logits.shape[0] == b
    # 12 of the system prompt's 13 tokens fill 3 blocks of 4, shared while 4 or more of the
    # 5 rows that have it decode (in the graph for 8 rows)
    found = [f for f in shared if f is not None]
    assert found and {blocks for blocks, _ in found} == {3}
    assert all(4 <= members <= 5 for _, members in found)
    # and the kernel attended to them: 12 tokens for as many rows, once per layer and step
    assert cascades.count((12, 5)) >= 2 * found.count((3, 5))


def test_attention_kernels_get_16_byte_aligned_metadata(model_dir, monkeypatch):
    """Every tensor the attention kernels read their metadata from (block tables, context
    lengths, slots, cumulative lengths) starts at a 16-byte boundary, in decode steps of any
    batch size and in prefill steps with cached context: Triton specialises a kernel on its
    pointers' alignment, so a misaligned view compiles another variant in the middle of a step
    (the GPU test `test_steps_compile_nothing[eager]` found tables staged after an odd number
    of context lengths)."""
    import nv_kernels.triton_attention as attention
    from nv_kernels import AttentionMetadata

    seen = []
    fields = ("block_tables", "context_lens", "slot_mapping", "cu_seqlens_q", "cu_seqlens_k")

    def recording(fn):
        def call(*args, **kwargs):
            meta = next(a for a in args if isinstance(a, AttentionMetadata))
            kind = "prefill" if meta.is_prefill else "decode"
            seen.extend((f"{kind} {name}", getattr(meta, name)) for name in fields)
            return fn(*args, **kwargs)

        return call

    for name in ("decode_attention", "prefill_attention"):
        monkeypatch.setattr(attention, name, recording(getattr(attention, name)))
    path, prompts, _ = model_dir
    kw = dict(device="cpu", attention_backend="triton", kvcache_block_size=4, enforce_eager=True)
    with LLM(str(path), **kw) as llm:
        for count in (1, 3, 5):  # decode batches of 1, 3 and 5 rows (lengths of odd counts)
            params = SamplingParams(temperature=0.0, max_tokens=3)
            llm.generate(prompts[:count], params, use_tqdm=False)  # shared prefixes: cache hits
    staged = [(name, t) for name, t in seen if t is not None]
    assert {name for name, _ in staged} >= {
        "decode block_tables", "decode context_lens", "prefill block_tables", "prefill cu_seqlens_k"
    }  # fmt: skip
    assert [name for name, t in staged if t.data_ptr() % 16] == []


def test_eager_steps_launch_no_kernel_variant_start_up_did_not(model_dir):
    """What CUDA start-up runs without graphs (the prefill, eager-decode and sampler warm-ups)
    launches every Triton variant that eager steps of any shape then launch: decode batches of
    1 to 5 rows, prefix hits, a chunked prompt, greedy and sampled rows. Under the interpreter,
    each launch's specialisation key is recorded as a GPU would compile it
    (`nv_testing.triton_specialisations`), for the kernels a CPU run has: attention, KV store,
    sampler. A variant first seen in a step is a compile in the middle of serving on a GPU
    (`test_steps_compile_nothing`, its GPU counterpart, checks every kernel)."""
    from nv_testing import triton_specialisations

    path, prompts, _ = model_dir
    kw = dict(device="cpu", attention_backend="triton", kvcache_block_size=4, enforce_eager=True)
    with (
        triton_specialisations() as seen,
        LLM(str(path), **kw, fused_sampler=True, max_num_batched_tokens=32) as llm,
    ):
        runner = llm.model_runner
        runner._warm_up_prefill()
        runner._warm_up_eager_decode()
        runner._warm_up_sampler()
        started = {name: set(keys) for name, keys in seen.items()}
        for count in (1, 2, 3, 5):  # shared prefixes: cache hits after the first
            params = [SamplingParams(temperature=t, max_tokens=3) for t in (0.0, 0.8)]
            llm.generate(prompts[:count], params[count % 2], use_tqdm=False)
        long = list(range(3, 60))  # past max_num_batched_tokens: a chunked prefill
        llm.generate([long], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert {"_decode_kernel", "_prefill_kernel"} <= seen.keys()
    new = {name: keys - started.get(name, set()) for name, keys in seen.items()}
    assert {name: keys for name, keys in new.items() if keys} == {}


def test_warm_ups_run_every_shape_and_write_nothing(model_dir):
    # what start-up runs on CUDA without graphs (the Triton decode kernel's variants), here
    # under the interpreter: one-sequence decode steps over tables of 1, 2, 4, 8, 16 blocks
    path, prompts, refs = model_dir
    kw = dict(device="cpu", attention_backend="triton", kvcache_block_size=4, max_model_len=64)
    with LLM(str(path), **kw) as llm:
        llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)
        runner = llm.model_runner
        assert runner.max_blocks_per_seq == 16
        cache = [c.clone() for c in runner.kv_cache]
        runner._warm_up_eager_decode()
        projected = []  # and they project every row-count class of the LM head's skinny GEMM
        compute_logits = runner.model.compute_logits
        runner.model.compute_logits = lambda h, *a, **k: (
            projected.append(h.shape[0]) or compute_logits(h, *a, **k)
        )
        runner._warm_up_prefill()  # the prefill warm-ups (CUDA's too) write nothing either
        assert set(skinny_variant_rows()) <= set(projected)
        runner.model.compute_logits = compute_logits
        assert all(map(torch.equal, runner.kv_cache, cache))
        greedy = SamplingParams(temperature=0.0, max_tokens=4)
        out = llm.generate(prompts[:1], greedy, use_tqdm=False)
        assert out[0]["token_ids"] == refs[0][:4]


@OVERLAP
def test_logprobs_survive_preemption(model_dir, async_scheduling):
    path, prompts, refs = model_dir
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, logprobs=1, prompt_logprobs=1)
        for n in MAX_NEW
    ]
    outs = {}
    for blocks in (24, None):  # preempted (recomputed from scratch), and not
        kw = dict(
            kvcache_block_size=4, num_kvcache_blocks=blocks, async_scheduling=async_scheduling
        )
        with LLM(str(path), device="cpu", **kw) as llm:
            outs[blocks] = llm.generate(prompts, params, use_tqdm=False)
            assert (llm.scheduler.num_preemptions > 0) == (blocks is not None)
            assert_pool_whole(llm)
    for small, big, prompt, ref in zip(outs[24], outs[None], prompts, refs, strict=True):
        assert small["token_ids"] == big["token_ids"] == ref
        assert len(small["logprobs"]) == len(ref) and len(small["prompt_logprobs"]) == len(prompt)
        pairs = list(zip(small["prompt_logprobs"][1:], big["prompt_logprobs"][1:], strict=True))
        pairs += list(zip(small["logprobs"], big["logprobs"], strict=True))
        for a, b in pairs:
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) <= 1e-4 for t in a)
