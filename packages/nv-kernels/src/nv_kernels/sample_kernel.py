"""The sampler's common case in two Triton kernels: greedy and temperature-only rows (no top-k,
top-p or min-p), for any mix of them in one batch.

Kernel 1 takes each row in chunks of the vocabulary (as many as it takes for a small batch to fill
the GPU, as few as it can for a large one, where per-program overheads dominate): it reads the
logits once, adds the row's Gumbel noise in registers (the same hash of (seed, step, token id)
as `sampler.exponential_noise`, 32-bit per token, so both paths draw the same token) and keeps
the chunk's best score and its index. Kernel 2 picks the best chunk per row. The compiled torch
version of the same draw materialises the noise for the whole batch (timings in
docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from nv_kernels.triton_utils import num_sms, tl, triton

BLOCK = 2048  # vocabulary entries a program takes at a time
MAX_CHUNKS = 128  # programs per row at most (a batch of one: 75 for a 151,936-token vocab)
PROGRAMS_PER_SM = 4  # the batch's programs: enough per SM to hide latency, few enough to be cheap

if triton is not None:

    @triton.jit
    def _mix32(x):
        # x: uint32. lowbias32, as in sampler._mix32.
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _splitmix64(x):
        # x: uint64. Wrapping multiplies and logical shifts, as in sampler._splitmix64.
        x = x + 0x9E3779B97F4A7C15
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        return x ^ (x >> 31)

    @triton.jit(do_not_specialize=["chunk", "num_chunks"])
    def _chunk_best_kernel(
        logits_ptr,
        stride_row,
        temps_ptr,
        seeds_ptr,
        steps_ptr,
        best_ptr,
        index_ptr,
        V,
        chunk,
        num_chunks,
        HAS_TEMPS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Program (row, c): the best score among tokens [c * chunk, (c + 1) * chunk), BLOCK at a
        # time; each lane keeps its best, so the cross-lane reductions run once at the end.
        row = tl.program_id(0)
        c = tl.program_id(1)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        if HAS_TEMPS:
            t = tl.load(temps_ptr + row)
            seed = tl.load(seeds_ptr + row).to(tl.uint64)
            step = tl.load(steps_ptr + row).to(tl.uint64)
            row_key = _splitmix64(seed * 0x94D049BB133111EB + step)
            lo = (row_key & 0xFFFFFFFF).to(tl.uint32)
            hi = (row_key >> 32).to(tl.uint32)
        start = c * chunk
        end = tl.minimum(start + chunk, V)
        best_v = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        best_i = tl.zeros((BLOCK,), dtype=tl.int32) + start
        for s in range(start, end, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            mask = offs < end
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # two ifs: HAS_TEMPS is resolved at compile time, and without it `t` does not exist
            if HAS_TEMPS:  # noqa: SIM102
                if t > 0:
                    bits = _mix32(_mix32((offs.to(tl.uint32) * 0x9E3779B9) ^ lo) ^ hi)
                    # in (0, 1), as sampler.uniform_from_bits: never 1, so -log(u) > 0
                    u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / (1 << 23))
                    # argmax(probs / E) with E = -log(u) ~ Exp(1), in log space
                    x = x / t - tl.log(-tl.log(u))
            x = tl.where(mask, x, float("-inf"))
            take = x > best_v  # strict: a lane keeps its earliest maximum (NaN is never taken)
            best_v = tl.where(take, x, best_v)
            best_i = tl.where(take, offs, best_i)
        best = tl.max(best_v, axis=0)
        # the lowest index among the chunk's maxima, as torch.argmax breaks ties
        index = tl.min(tl.where(best_v == best, best_i, V), axis=0)
        index = tl.minimum(index, V - 1)  # an all-NaN chunk: still a valid id
        tl.store(best_ptr + row * num_chunks + c, best)
        tl.store(index_ptr + row * num_chunks + c, index.to(tl.int64))

    @triton.jit(do_not_specialize=["num_chunks"])
    def _pick_chunk_kernel(best_ptr, index_ptr, out_ptr, num_chunks, MAX_CHUNKS: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, MAX_CHUNKS)
        mask = offs < num_chunks
        best = tl.load(best_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
        top = tl.max(best, axis=0)
        chunk = tl.min(tl.where((best == top) & mask, offs, MAX_CHUNKS), axis=0)
        chunk = tl.minimum(chunk, num_chunks - 1)  # all-NaN row: no chunk matched
        tl.store(out_ptr + row, tl.load(index_ptr + row * num_chunks + chunk))


def split_vocab(batch: int, vocab_size: int, sms: int) -> tuple[int, int]:
    """(chunk, num_chunks): each row's vocabulary in chunks of whole BLOCKs, enough of them that
    the batch gives PROGRAMS_PER_SM programs per SM, at most MAX_CHUNKS per row."""
    blocks = triton.cdiv(vocab_size, BLOCK)
    per_row = max(1, min(blocks, triton.cdiv(PROGRAMS_PER_SM * sms, max(batch, 1)), MAX_CHUNKS))
    chunk = triton.cdiv(blocks, per_row) * BLOCK
    return chunk, triton.cdiv(vocab_size, chunk)


def fused_sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row of `logits` `[B, V]` (int64 `[B]`): argmax where the temperature is 0
    or `temperatures` is None (all greedy), else the Gumbel-max draw of `sampler.sample` without
    filters. `seeds` and `steps` are int64 `[B]`, needed with `temperatures`."""
    b, v = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("fused_sample needs logits with a contiguous last dim")
    has_temps = temperatures is not None
    if has_temps and (seeds is None or steps is None):
        raise ValueError("fused_sample needs seeds and steps with temperatures")
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    chunk, num_chunks = split_vocab(b, v, num_sms(logits.device, otherwise=4))
    best = torch.empty(b, num_chunks, dtype=torch.float32, device=logits.device)
    index = torch.empty(b, num_chunks, dtype=torch.int64, device=logits.device)
    _chunk_best_kernel[(b, num_chunks)](
        logits,
        logits.stride(0),
        temperatures if has_temps else logits,
        seeds if has_temps else logits,
        steps if has_temps else logits,
        best,
        index,
        v,
        chunk,
        num_chunks,
        HAS_TEMPS=has_temps,
        BLOCK=BLOCK,
        num_warps=8,
    )
    _pick_chunk_kernel[(b,)](best, index, out, num_chunks, MAX_CHUNKS=MAX_CHUNKS)
    return out
