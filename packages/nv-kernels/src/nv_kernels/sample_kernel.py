"""The sampler's common case in two Triton kernels: greedy and temperature-only rows (no top-k,
top-p or min-p), for any mix of them in one batch.

Kernel 1 takes each row in chunks of the vocabulary (so even one row fills the GPU): it reads the
logits once, adds the row's Gumbel noise in registers (the same hash of (seed, step, token id)
as `sampler.exponential_noise`, 32-bit per token, so both paths draw the same token) and keeps
the chunk's best score and its index. Kernel 2 picks the best chunk per row. The compiled torch
version of the same draw materialises the noise for the whole batch: 450 us at 256 rows on an
H200.
"""

from __future__ import annotations

import torch

from nv_kernels.triton_utils import tl, triton

CHUNK = 2048  # vocabulary entries per program: 75 programs per row for a 151,936-token vocab

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

    @triton.jit
    def _chunk_best_kernel(
        logits_ptr,
        stride_row,
        temps_ptr,
        seeds_ptr,
        steps_ptr,
        best_ptr,
        index_ptr,
        V,
        NUM_CHUNKS: tl.constexpr,
        CHUNK: tl.constexpr,
        HAS_TEMPS: tl.constexpr,
    ):
        # Program (row, c): the best score among tokens [c * CHUNK, (c + 1) * CHUNK).
        row = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < V
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_TEMPS:
            t = tl.load(temps_ptr + row)
            if t > 0:
                seed = tl.load(seeds_ptr + row).to(tl.uint64)
                step = tl.load(steps_ptr + row).to(tl.uint64)
                row_key = _splitmix64(seed * 0x94D049BB133111EB + step)
                lo = (row_key & 0xFFFFFFFF).to(tl.uint32)
                hi = (row_key >> 32).to(tl.uint32)
                bits = _mix32(_mix32((offs.to(tl.uint32) * 0x9E3779B9) ^ lo) ^ hi)
                u = ((bits >> 8) + 1).to(tl.float32) * (1.0 / (1 << 24))  # uniform in (0, 1]
                # argmax(probs / E) with E = -log(u) ~ Exp(1), in log space
                x = x / t - tl.log(-tl.log(u))
        x = tl.where(mask, x, float("-inf"))
        best = tl.max(x, axis=0)
        # the lowest index among the chunk's maxima, as torch.argmax breaks ties
        index = tl.min(tl.where(x == best, offs, V), axis=0)
        index = tl.minimum(index, V - 1)  # NaN logits match nothing: still return a valid id
        tl.store(best_ptr + row * NUM_CHUNKS + c, best)
        tl.store(index_ptr + row * NUM_CHUNKS + c, index)

    @triton.jit
    def _pick_chunk_kernel(
        best_ptr, index_ptr, out_ptr, NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < NUM_CHUNKS
        best = tl.load(best_ptr + row * NUM_CHUNKS + offs, mask=mask, other=float("-inf"))
        top = tl.max(best, axis=0)
        chunk = tl.min(tl.where((best == top) & mask, offs, NUM_CHUNKS), axis=0)
        chunk = tl.minimum(chunk, NUM_CHUNKS - 1)  # all-NaN row: no chunk matched
        tl.store(out_ptr + row, tl.load(index_ptr + row * NUM_CHUNKS + chunk))


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
    num_chunks = triton.cdiv(v, CHUNK)
    best = torch.empty(b, num_chunks, dtype=torch.float32, device=logits.device)
    index = torch.empty(b, num_chunks, dtype=torch.int64, device=logits.device)
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    has_temps = temperatures is not None
    if has_temps and (seeds is None or steps is None):
        raise ValueError("fused_sample needs seeds and steps with temperatures")
    _chunk_best_kernel[(b, num_chunks)](
        logits,
        logits.stride(0),
        temperatures if has_temps else logits,
        seeds if has_temps else logits,
        steps if has_temps else logits,
        best,
        index,
        v,
        NUM_CHUNKS=num_chunks,
        CHUNK=CHUNK,
        HAS_TEMPS=has_temps,
        num_warps=8,
    )
    _pick_chunk_kernel[(b,)](
        best, index, out, NUM_CHUNKS=num_chunks, BLOCK=triton.next_power_of_2(num_chunks)
    )
    return out
