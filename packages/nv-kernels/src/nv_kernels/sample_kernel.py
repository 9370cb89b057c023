"""The sampler's common case in two Triton kernels: greedy and temperature-only rows (no top-k,
top-p or min-p), for any mix of them in one batch.

Kernel 1 takes each row in chunks of the vocabulary (as many as it takes for a small batch to fill
the GPU, as few as it can for a large one, where per-program overheads dominate): it reads the
logits once, adds the row's Gumbel noise in registers (the same hash of (seed, step, token id)
as `sampler.exponential_noise`, 32-bit per token, so both paths draw the same token) and keeps
the chunk's best score and its token id. Kernel 2 picks the best chunk per row. Kernel 1 also
takes a part of the vocabulary (a tensor-parallel rank's shard of the logits, with the token ids'
offset): every rank's candidates, gathered, give kernel 2 the whole vocabulary's draw, without
gathering the logits (`Sampler.sample_sharded`). The compiled torch
version of the same draw materialises the noise for the whole batch (timings in
docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from nv_kernels.triton_utils import num_sms, tl, triton

LOG2E = 1.4426950408889634  # log2(e): the draw works in base 2
SERIES_BELOW = 1 / 64  # 1 - u under this: the noise -ln(u) from its series, not from log2(u)

if triton is not None:
    from triton.language.extra import libdevice

    _LOG2E = tl.constexpr(LOG2E)
    _SERIES_BELOW = tl.constexpr(SERIES_BELOW)

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

    # the integers that vary from step to step are not specialised on: a step then never
    # compiles (see pick_candidates). `chunk` is: always whole BLOCKs (split_vocab), it gives
    # one variant, whose loads are known aligned (vector loads)
    @triton.jit(do_not_specialize=["B", "vocab_offset", "num_chunks"])
    def _chunk_best_kernel(
        logits_ptr,
        stride_row,
        temps_ptr,
        seeds_ptr,
        steps_ptr,
        cand_ptr,
        B,
        V,
        vocab_offset,
        chunk,
        num_chunks,
        HAS_TEMPS: tl.constexpr,
        FAST_LOG: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Program (row, c): the best score among tokens [c * chunk, (c + 1) * chunk) of this
        # vocabulary part (token ids vocab_offset + ...), BLOCK at a time; each lane keeps its
        # best, so the cross-lane reductions run once at the end. Writes the candidate to
        # cand[0, row, c] (the score's fp32 bits) and cand[1, row, c] (its token id).
        row = tl.program_id(0)
        c = tl.program_id(1)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        if HAS_TEMPS:
            t = tl.load(temps_ptr + row)
            scale = _LOG2E / tl.where(t > 0, t, 1.0)  # once per row, not per token
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
                    token = (offs + vocab_offset).to(tl.uint32)
                    bits = _mix32(_mix32((token * 0x9E3779B9) ^ lo) ^ hi)
                    # the noise of sampler.exponential_noise (base-2 units), the draw of
                    # sampler.sample: u in (0, 1), never 1 (sampler.uniform_from_bits)
                    u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / (1 << 23))
                    w = 1.0 - u  # exact where it is used (u > 1/2)
                    series = w * (1.0 + w * (0.5 + w * (1.0 / 3))) * _LOG2E
                    if FAST_LOG:  # the SFU's lg2.approx: two per token, not two polynomials
                        e = tl.where(w < _SERIES_BELOW, series, -libdevice.fast_log2f(u))
                        x = x * scale - libdevice.fast_log2f(e)
                    else:  # the interpreter has no libdevice
                        e = tl.where(w < _SERIES_BELOW, series, -tl.log2(u))
                        x = x * scale - tl.log2(e)
            x = tl.where(mask, x, float("-inf"))
            take = x > best_v  # strict: a lane keeps its earliest maximum (NaN is never taken)
            best_v = tl.where(take, x, best_v)
            best_i = tl.where(take, offs, best_i)
        best = tl.max(best_v, axis=0)
        # the lowest index among the chunk's maxima, as torch.argmax breaks ties
        index = tl.min(tl.where(best_v == best, best_i, V), axis=0)
        index = tl.minimum(index, V - 1)  # an all-NaN chunk: still a valid id
        at = cand_ptr + row * num_chunks + c
        tl.store(at, best.to(tl.int32, bitcast=True))
        tl.store(at + B * num_chunks, index + vocab_offset)

    @triton.jit(do_not_specialize=["B", "num_chunks", "num_cands"])
    def _pick_kernel(cand_ptr, out_ptr, B, num_chunks, num_cands, CANDS: tl.constexpr):
        # Row `row`'s candidates from every vocabulary part p (cand[p, 0 | 1, row, c]), in token
        # order (part by part, chunk by chunk): the best, the earliest among equals.
        row = tl.program_id(0)
        k = tl.arange(0, CANDS)
        mask = k < num_cands
        part = k // num_chunks
        at = cand_ptr + part * (2 * B * num_chunks) + row * num_chunks + k % num_chunks
        best = tl.load(at, mask=mask, other=0).to(tl.float32, bitcast=True)
        best = tl.where(mask, best, float("-inf"))
        top = tl.max(best, axis=0)
        first = tl.min(tl.where((best == top) & mask, k, CANDS), axis=0)
        first = tl.minimum(first, num_cands - 1)  # all-NaN row: no candidate matched
        part = first // num_chunks
        token = tl.load(cand_ptr + part * (2 * B * num_chunks) + B * num_chunks
                        + row * num_chunks + first % num_chunks)  # fmt: skip
        tl.store(out_ptr + row, token.to(tl.int64))


def split_vocab(batch: int, vocab_size: int, sms: int) -> tuple[int, int]:
    """(chunk, num_chunks): each row's vocabulary in chunks of whole BLOCKs, enough of them that
    the batch gives PROGRAMS_PER_SM programs per SM, at most MAX_CHUNKS per row."""
    blocks = triton.cdiv(vocab_size, BLOCK)
    per_row = max(1, min(blocks, triton.cdiv(PROGRAMS_PER_SM * sms, max(batch, 1)), MAX_CHUNKS))
    chunk = triton.cdiv(blocks, per_row) * BLOCK
    return chunk, triton.cdiv(vocab_size, chunk)


def chunk_candidates(
    logits: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
    vocab_offset: int = 0,
) -> torch.Tensor:
    """Kernel 1 over `logits` `[B, V]`, the part of the vocabulary starting at token id
    `vocab_offset` (tensor parallelism: this rank's shard): each chunk's best score, with the
    row's noise for those token ids, and its token id, as int32 `[2, B, num_chunks]` (the
    scores' fp32 bits, then the ids). Every part's candidates, stacked `[P, 2, B, num_chunks]`
    in vocabulary order, go to `pick_candidates`: the draw is then the whole vocabulary's."""
    b, v = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("fused sampling needs logits with a contiguous last dim")
    has_temps = temperatures is not None
    if has_temps and (seeds is None or steps is None):
        raise ValueError("fused sampling needs seeds and steps with temperatures")
    chunk, num_chunks = split_vocab(b, v, num_sms(logits.device, otherwise=4))
    cands = torch.empty(2, b, num_chunks, dtype=torch.int32, device=logits.device)
    if b == 0:
        return cands
    _chunk_best_kernel[(b, num_chunks)](
        logits,
        logits.stride(0),
        temperatures if has_temps else logits,
        seeds if has_temps else logits,
        steps if has_temps else logits,
        cands,
        b,
        v,
        vocab_offset,
        chunk,
        num_chunks,
        HAS_TEMPS=has_temps,
        FAST_LOG=logits.device.type == "cuda",
        BLOCK=BLOCK,
        num_warps=8,
    )
    return cands


def pick_candidates(cands: torch.Tensor) -> torch.Tensor:
    """Kernel 2: each row's token (int64 `[B]`) from the candidates of every vocabulary part,
    `[P, 2, B, num_chunks]` (see `chunk_candidates`)."""
    parts, _, b, num_chunks = cands.shape
    out = torch.empty(b, dtype=torch.int64, device=cands.device)
    if b:
        # one compiled variant per number of parts, whatever the batch: a kernel compiled in
        # the middle of serving loads a module, which waits for the device (forever, with a
        # collective stuck on a dead tensor-parallel peer: measured)
        cands_pad = triton.next_power_of_2(parts * MAX_CHUNKS)
        _pick_kernel[(b,)](cands, out, b, num_chunks, parts * num_chunks, CANDS=cands_pad)
    return out


def fused_sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row of `logits` `[B, V]` (int64 `[B]`): argmax where the temperature is 0
    or `temperatures` is None (all greedy), else the Gumbel-max draw of `sampler.sample` without
    filters. `seeds` and `steps` are int64 `[B]`, needed with `temperatures`."""
    return pick_candidates(chunk_candidates(logits, temperatures, seeds, steps)[None])
