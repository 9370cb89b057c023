"""Shared test helpers: tiny random Hugging Face checkpoints and a minimal paged-forward harness."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from nv_kernels import AttentionMetadata, SharedPrefix, get_attention_backend
from nv_kvcache import BlockManager
from nv_models import TPGroup, build_model, load_weights

# A tiny decoder, untied with a wide init (initializer_range 0.15) so that greedy tokens vary.
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.15,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_qwen3_config(**overrides) -> Qwen3Config:
    kw = dict(TINY, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0)
    kw.update(overrides)
    return Qwen3Config(**kw)


def save_tiny_qwen3(path: Path, seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """Save a random tiny Qwen3 (safetensors) to `path`; returns the HF model (fp32, eval)."""
    torch.manual_seed(seed)
    config = tiny_qwen3_config(**overrides)
    config.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM(config).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def load_ours(path: Path, backend: str = "torch", tp: TPGroup = TPGroup()):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    model = build_model(config, tp, get_attention_backend(backend, "cpu")).float()
    load_weights(model, path)
    return model.eval()


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PagedHarness:
    """Drives one of our models through a BlockManager-owned paged cache, one step at a time."""

    def __init__(self, model, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.model = model
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.block_size = block_size
        for layer in model.model.layers:
            attn = layer.self_attn.attn
            shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache, attn.v_cache = torch.zeros(shape), torch.zeros(shape)
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def add(self, seq: str, tokens: list[int]) -> int:
        cached = self.bm.allocate(seq, tokens, keep_tokens=False)
        assert cached is not None
        self.tokens[seq] = list(tokens)
        self.computed[seq] = cached
        return cached

    def _slots(self, seq: str, start: int, end: int) -> list[int]:
        table = self.bm.block_table(seq)
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _tables(self, seqs: list[str]) -> torch.Tensor:
        tables = [self.bm.block_table(s) for s in seqs]
        width = max(len(t) for t in tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)

    @torch.no_grad()
    def prefill(self, chunks: dict[str, int]) -> torch.Tensor:
        """Compute `chunks[seq]` more tokens of each sequence; returns all their logits."""
        ids, pos, slots, cu_q, cu_k = [], [], [], [0], [0]
        for seq, n in chunks.items():
            start = self.computed[seq]
            ids += self.tokens[seq][start : start + n]
            pos += list(range(start, start + n))
            slots += self._slots(seq, start, start + n)
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + start + n)
        seqs = list(chunks)
        meta = AttentionMetadata(
            True,
            torch.tensor(slots),
            None,
            self._tables(seqs),
            torch.tensor(cu_q, dtype=torch.int32),
            torch.tensor(cu_k, dtype=torch.int32),
            max(chunks.values()),
            max(c - p for c, p in zip(cu_k[1:], cu_k, strict=False)),
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), meta)
        for seq, n in chunks.items():
            self.computed[seq] += n
            self.bm.mark_computed(seq, self.computed[seq], self.tokens[seq])
        return self.model.compute_logits(hidden)

    @torch.no_grad()
    def decode(self, next_tokens: dict[str, int]) -> torch.Tensor:
        """Append one token per sequence and compute it; returns [num_seqs, vocab] logits."""
        seqs = list(next_tokens)
        for seq, tok in next_tokens.items():
            assert self.bm.append_slots(seq)
            self.tokens[seq].append(tok)
        lens = [len(self.tokens[s]) for s in seqs]
        meta = AttentionMetadata(
            False,
            torch.tensor([self._slots(s, n - 1, n)[0] for s, n in zip(seqs, lens, strict=True)]),
            torch.tensor(lens, dtype=torch.int32),
            self._tables(seqs),
        )
        ids = torch.tensor([self.tokens[s][-1] for s in seqs])
        hidden = self.model(ids, torch.tensor([n - 1 for n in lens]), meta)
        for seq, n in zip(seqs, lens, strict=True):
            self.computed[seq] = n
            self.bm.mark_computed(seq, n, self.tokens[seq])
        return self.model.compute_logits(hidden)


def shared_prefix_prompts(lens: list[int], seed: int = 11, vocab: int = 512) -> list[list[int]]:
    """Random prompts; prompt 4 starts with prompt 3's first 24 tokens, prompt 5 with prompt 1
    (so prefix caching has something to find)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    prompts[4] = prompts[3][:24] + prompts[4]
    prompts[5] = prompts[1] + prompts[5]
    return prompts


@torch.no_grad()
def hf_greedy(
    hf, prompts: list[list[int]], max_new: list[int], eos: int | None = None
) -> list[list[int]]:
    """transformers' greedy `generate`, one prompt at a time, cut after the first EOS (None:
    no EOS, every prompt runs to its max_new)."""
    device = next(hf.parameters()).device
    refs = []
    for p, n in zip(prompts, max_new, strict=True):
        out = hf.generate(
            torch.tensor([p], device=device),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        refs.append(out[: out.index(eos) + 1] if eos in out else out)
    return refs


def assert_fp8_cache_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp8 caches equal bit for bit, except for two known faults of the float -> fp8 cast of
    Triton's CPU interpreter (the GPU's cvt.rn has neither; tests/gpu checks bit for bit):
    rounding up across a power of two drops the carry (in e4m3, 31.1 becomes 16, not 32), and
    subnormals are truncated (0.00908 becomes 4 steps of 2^-9, not 5). Each other difference
    fails."""
    import os

    same = got.view(torch.uint8) == want.view(torch.uint8)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert same.all(), f"{int((~same).sum())} fp8 values differ"
        return
    g, w = got.float()[~same], want.float()[~same]
    mantissa, _ = torch.frexp(w.abs())
    dropped_carry = (g == w / 2) & (mantissa == 0.5)
    # (up to the smallest normal, which truncation misses by one subnormal step too)
    info = torch.finfo(got.dtype)
    step = info.tiny * info.eps  # the subnormal step: 2^-9 in e4m3, 2^-16 in e5m2
    truncated_subnormal = (w.abs() <= info.tiny) & (w.abs() - g.abs() == step) & (g * w >= 0)
    assert (dropped_carry | truncated_subnormal).all(), (g, w)


def decode_meta(
    lens: list[int],
    block_tables: torch.Tensor,
    shared_prefix: tuple[int, list[int], list[int]] | None = None,
) -> AttentionMetadata:
    """Decode metadata for a kernel test: one query per sequence of `lens` cached tokens (its
    newest included) read through `block_tables`, writing nothing; `shared_prefix`, (tokens,
    blocks, rows) of cascade attention. On the tables' device."""
    dev = block_tables.device

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=dev)

    shared = None
    if shared_prefix is not None:
        length, blocks, rows = shared_prefix
        shared = SharedPrefix(i32([length]), i32(blocks), i32(rows))
    zeros = torch.zeros(len(lens), dtype=torch.int64, device=dev)
    return AttentionMetadata(False, zeros, i32(lens), block_tables, shared_prefix=shared)


def paged_layout(
    gen: torch.Generator, lens: list[int], block_size: int, num_blocks: int
) -> tuple[torch.Tensor, list[list[int]]]:
    """Each sequence's tokens scattered over randomly chosen, non-contiguous blocks: the block
    tables `[num_seqs, max_blocks]` (int32, zero-padded) and each sequence's slot per token."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for n in lens:
        blocks = [perm.pop() for _ in range(-(-n // block_size))]
        tables.append(blocks)
        slots.append([blocks[p // block_size] * block_size + p % block_size for p in range(n)])
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return table, slots


def assert_unguarded_tp2_script_fails_fast(model: Path, tmp_path: Path, **llm_kwargs) -> None:
    """Run a script that builds a TP=2 `LLM` without `if __name__ == "__main__":`. Spawned
    workers re-import it and die at once; the engine must say so (the rank, then the guard)
    within the subprocess limit, a hang guard, not the rendezvous timeout."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    kwargs = "".join(f", {k}={v!r}" for k, v in llm_kwargs.items())
    script.write_text(
        f"from nv_engine import LLM\nLLM({str(model)!r}, tensor_parallel_size=2{kwargs})\n"
    )
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=150, cwd=tmp_path
    )
    assert r.returncode != 0
    assert "tensor-parallel worker rank 1 exited while starting" in r.stderr, r.stderr[-3000:]
    assert "__main__" in r.stderr.splitlines()[-1], r.stderr[-3000:]


@contextlib.contextmanager
def triton_specialisations() -> Iterator[dict[str, set[str]]]:
    """Under Triton's interpreter (CPU), record for each nv_kernels JIT function the key of
    the variant each launch would compile on a GPU, as Triton specialises: constexprs and launch
    options by value, integers by class (1, a multiple of 16, other) unless
    `do_not_specialize`d, tensors by dtype and whether they start at a 16-byte boundary.
    Yields {kernel name: keys seen}, filled as kernels launch. What a CPU run can say about
    compiles in a step, for the kernels it runs (attention, KV store, sampler)."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, set[str]] = {}
    run = InterpretedFunction.run

    def key(fn: InterpretedFunction, args: tuple, kwargs: dict) -> str:
        params = inspect.signature(fn.fn).parameters
        exempt = set(fn.kwargs.get("do_not_specialize") or ())
        parts = []
        # positional arguments, then keywords (constexprs, and launch options: not parameters)
        for name, v in [*zip(fn.arg_names, args, strict=False), *sorted(kwargs.items())]:
            if name not in params or "constexpr" in str(params[name].annotation):
                parts.append(f"{name}={v!r}")
            elif isinstance(v, torch.Tensor):
                parts.append(f"{name}:{v.dtype}:{v.data_ptr() % 16 == 0}")
            elif isinstance(v, int) and not isinstance(v, bool) and name not in exempt:
                parts.append(f"{name}:{'1' if v == 1 else '16' if v % 16 == 0 else 'n'}")
            else:  # floats, and integers Triton does not specialise on
                parts.append(name)
        return " ".join(parts)

    def recording(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("nv_kernels"):
            seen.setdefault(self.fn.__name__, set()).add(key(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        yield seen
    finally:
        InterpretedFunction.run = run


def _compiled_so_far() -> dict[str, list[str]]:
    """What this process compiled: per nv_kernels JIT function ("module.name"), the keys of
    its compiled variants (Triton's specialisations: constexprs, dtypes, alignments); and the
    graphs torch.compile produced, under "torch.compile" (their count)."""
    import importlib
    import pkgutil

    from torch._dynamo.utils import counters
    from triton.runtime.jit import JITFunction

    import nv_kernels

    compiled = {}
    for info in pkgutil.iter_modules(nv_kernels.__path__):
        for name, obj in vars(importlib.import_module(f"nv_kernels.{info.name}")).items():
            if isinstance(obj, JITFunction):
                keys = [str(k) for c in obj.device_caches.values() for k in c[0]]
                compiled[f"{info.name}.{name}"] = sorted(keys)
    compiled["torch.compile"] = [str(counters["stats"]["unique_graphs"])]
    return compiled


def compiles_during_steps(model: str, enforce_eager: bool = False) -> tuple[dict, dict]:
    """What a bf16 engine on `model` (a tiny Qwen3 checkpoint) compiled (`_compiled_so_far`)
    once started, and after steps of every shape: prompts of 1..450 tokens alone and in
    batches, prefix hits, chunked prefill, and every sampling path (greedy, seeded, top-p,
    top-k, min-p, logprobs with a penalty, prompt logprobs). Run it in a fresh process."""
    from nv_engine import LLM, SamplingParams

    kw = dict(dtype="bfloat16", kvcache_block_size=16, max_num_seqs=64, enforce_eager=enforce_eager)
    with LLM(model, max_num_batched_tokens=256, **kw) as llm:
        before = _compiled_so_far()
        g = torch.Generator().manual_seed(0)
        lens = [1, 2, 3, 15, 16, 17, 31, 32, 33, 47, 48, 50, 63, 64, 65, 130, 300, 450]
        shaped = [
            SamplingParams(temperature=0, max_tokens=3),
            SamplingParams(temperature=0.8, seed=1, max_tokens=3),
            SamplingParams(temperature=0.8, top_p=0.9, max_tokens=3),
            SamplingParams(temperature=0.8, top_k=5, max_tokens=3),
            SamplingParams(temperature=0.8, min_p=0.1, max_tokens=3),
            SamplingParams(temperature=0.8, logprobs=2, repetition_penalty=1.2, max_tokens=3),
        ]
        for i, n in enumerate(lens):  # one prompt alone (300, 450: chunked)
            ids = torch.randint(3, 500, (n,), generator=g).tolist()
            llm.generate([ids], shaped[i % len(shaped)], use_tqdm=False)
            llm.generate([ids], shaped[(i + 1) % len(shaped)], use_tqdm=False)  # a prefix hit
        for count in (2, 5, 17, 40, 64):  # batches of mixed lengths and sampling
            batch = [torch.randint(3, 500, (n % 120 + 1,), generator=g).tolist()
                     for n in (lens * 4)[:count]]  # fmt: skip
            llm.generate(batch, [shaped[j % len(shaped)] for j in range(count)], use_tqdm=False)
        prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 40, 90)]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1),
                     use_tqdm=False)  # fmt: skip
        return before, _compiled_so_far()
