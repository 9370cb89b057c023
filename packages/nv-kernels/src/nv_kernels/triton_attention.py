"""Triton paged attention: varlen causal prefill (context read through block tables) and split-K
decode that reads each K/V tile once per KV head for its whole group of query heads."""

from __future__ import annotations

import torch
from torch import Tensor

from nv_kernels.attention_backend import AttentionBackend
from nv_kernels.kv_cache import v_token_minor
from nv_kernels.metadata import AttentionMetadata, SharedPrefix
from nv_kernels.pdl import pdl_kwargs, pdl_wait, use_pdl
from nv_kernels.store_kvcache import fp8_max
from nv_kernels.triton_utils import interpreting, num_sms, tl, triton

if triton is not None:
    # The interpreter (TRITON_INTERPRET=1) runs kernels as Python, which has no inline PTX:
    # there PLAIN_PAGE_LOAD reads the page number with tl.load, so CPU tests cover its path.
    _INTERPRETED = tl.constexpr(interpreting())

    # The block-table width (stride_bt) changes from step to step; specialising on it (== 1,
    # divisible by 16) would compile new kernel variants in the middle of a run.

    @triton.jit
    def _load_paged_kv(
        k_cache_ptr,
        v_cache_ptr,
        table_ptr,
        offs_n,
        n_mask,
        offs_d,
        kv_head,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_vd,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        V_TOKEN_MINOR: tl.constexpr,
        PLAIN_PAGE_LOAD: tl.constexpr,
    ):
        """K and V tiles [BLOCK_N, D] of one KV head: tokens `offs_n` (from a multiple of
        BLOCK_N) of the sequence whose block-table row starts at `table_ptr`. Tokens not in
        `n_mask` carry no weight: K is zero there, V zero or a finite value (their scores are
        -inf, so their weights are 0).

        K is head_dim-minor. So is V in 16-bit caches; fp8 caches store V token-minor
        (`V_TOKEN_MINOR`, nv_kernels.kv_cache), so that p·V's operand is contiguous along the
        dot's reduction as bytes: Triton then copies it into shared memory asynchronously and
        reads it from there straight into the tensor cores' operand layout, as it does K. A
        head_dim-minor fp8 V needs a transpose that 8-bit elements have no instruction for
        (docs/benchmarks.md: byte-wise reads, or a second pass through shared memory as fp16).

        PLAIN_PAGE_LOAD (tiles that divide the block): the tile's page number is read by
        a load that Triton's software pipeliner leaves alone. Otherwise it is copied into
        shared memory in the tile's own cp.async group, and as the next tile's addresses need
        it, every iteration starts by waiting for all copies in flight (cp.async.wait_group 0):
        one tile ahead, whatever num_stages says. See `plain_page_load` for where it pays."""
        if PLAIN_PAGE_LOAD:
            tl.static_assert(BLOCK_SIZE % BLOCK_N == 0)
            n0 = tl.min(offs_n, 0)  # the tile's first token: the whole tile is in its block
            if _INTERPRETED:
                page = tl.load(table_ptr + n0 // BLOCK_SIZE).to(tl.int64)
            else:
                # inline PTX takes tensors: a one-element one, summed back to a scalar
                page = tl.inline_asm_elementwise(
                    "ld.global.nc.b32 $0, [$1];",
                    "=r,l",
                    [table_ptr + n0 // BLOCK_SIZE + tl.zeros([1], tl.int32)],
                    dtype=tl.int32,
                    is_pure=True,
                    pack=1,
                )
                page = tl.sum(page, 0).to(tl.int64)
        else:
            page = tl.load(table_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_block = offs_n % BLOCK_SIZE
        rows = page * stride_kb + in_block * stride_kt + kv_head * stride_kh
        k = tl.load(k_cache_ptr + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v_offs = (page * stride_vb + in_block * stride_vt + kv_head * stride_vh)[:, None]
        v_offs += (offs_d * stride_vd)[None, :]
        if V_TOKEN_MINOR:
            if BLOCK_SIZE % 16 == 0:
                # Runs of min(BLOCK_N, BLOCK_SIZE) tokens are contiguous and start 16-byte
                # aligned (tiles start at multiples of BLOCK_N; strides are multiples of 16).
                run: tl.constexpr = min(BLOCK_N, BLOCK_SIZE)
                v_offs = tl.max_contiguous(tl.multiple_of(v_offs, [16, 16]), [run, 1])
            # Loaded whole: a mask along the contiguous axis would split the load into bytes.
            # A masked token reads block 0 (its page is 0) or its own block's unwritten slots,
            # finite either way: the caches start zeroed and the store kernels saturate (a NaN
            # becomes a finite limit), so its weight of 0 cancels it. Cleaning the tile here
            # (clamping NaN away) cost 13 % of the kernel's time (docs/benchmarks.md).
            v = tl.load(v_cache_ptr + v_offs)
        elif v_cache_ptr.dtype.element_ty.is_fp8():
            # Loaded unmasked and cast before the mask, it goes through shared memory as fp16
            # (ldmatrix.trans) rather than one byte at a time.
            v = tl.load(v_cache_ptr + v_offs)
            v = tl.where(n_mask[:, None], v.to(tl.float16), 0.0)
        else:
            v = tl.load(v_cache_ptr + v_offs, mask=n_mask[:, None], other=0.0)
        return k, v

    @triton.jit
    def _softmax_tile(q, k, v, keep, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
        """One K/V tile of the streaming (online) softmax in base 2: scores where `keep`, the
        running max `m_i`, sum `l_i` and output `acc` rescaled. Returns the new three. The dots
        run in q's dtype: K/V tiles (an fp8 cache's too) are cast to it in registers."""
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _attend_paged(
        q, k_cache_ptr, v_cache_ptr, table, start, end, offs_d, kv_head, scale, stride_kb,
        stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_vd, ROWS: tl.constexpr,
        D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        V_TOKEN_MINOR: tl.constexpr, PLAIN_PAGE_LOAD: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """The streaming softmax of the ROWS queries `q` (all of one KV head) over tokens
        [start, end) of the sequence whose block-table row is `table`, in tiles of BLOCK_N
        from `start` (a multiple of BLOCK_N, or of BLOCK_SIZE when that is smaller). Returns
        (running max, sum, unnormalised output), base 2; `scale` is the scores' (times K's)."""
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        qk_scale = scale * 1.4426950408889634  # (see the prefill kernel)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            k, v = _load_paged_kv(
                k_cache_ptr, v_cache_ptr, table, offs_n, n_mask, offs_d, kv_head,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_vd,
                BLOCK_SIZE, BLOCK_N, V_TOKEN_MINOR, PLAIN_PAGE_LOAD,
            )  # fmt: skip
            m_i, l_i, acc = _softmax_tile(
                q, k, v, n_mask[None, :], m_i, l_i, acc, qk_scale, PRECISION
            )
        return m_i, l_i, acc

    @triton.jit
    def _find_query_block(cu_q_ptr, slot, num_seqs, BLOCK_M: tl.constexpr):
        """The sequence and query block that prefill program `slot` computes. Sequence i owns
        the slots from cu_q[i] // BLOCK_M + i on: at least the cdiv(len_q, BLOCK_M) it needs,
        since floor(b / M) - floor(a / M) + 1 >= cdiv(b - a, M). So the grid follows the step's
        total query tokens rather than num_seqs x its longest chunk, which left most programs
        empty when one long prompt shares a step with short ones (or with decode rows)."""
        lo = 0
        hi = num_seqs - 1
        while lo < hi:  # the last sequence whose first slot is <= slot
            mid = (lo + hi + 1) // 2
            if tl.load(cu_q_ptr + mid) // BLOCK_M + mid <= slot:
                lo = mid
            else:
                hi = mid - 1
        return lo, slot - (tl.load(cu_q_ptr + lo) // BLOCK_M + lo)

    @triton.jit(do_not_specialize=["stride_bt", "num_seqs"])
    def _prefill_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        k_cache_ptr,
        v_cache_ptr,
        o_ptr,
        cu_q_ptr,
        cu_k_ptr,
        block_tables_ptr,
        scale,
        k_scale,
        v_scale,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ckb,
        stride_ckt,
        stride_ckh,
        stride_cvb,
        stride_cvt,
        stride_cvh,
        stride_cvd,
        stride_bt,
        stride_ot,
        stride_oh,
        num_seqs,
        G: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        V_TOKEN_MINOR: tl.constexpr,
        PLAIN_PAGE_LOAD: tl.constexpr,
        PAGED: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
    ):
        seq, mb = _find_query_block(cu_q_ptr, tl.program_id(0), num_seqs, BLOCK_M)
        head = tl.program_id(1)
        kv_head = head // G
        q_start = tl.load(cu_q_ptr + seq)
        len_q = tl.load(cu_q_ptr + seq + 1) - q_start
        if mb * BLOCK_M >= len_q:
            return
        k_start = tl.load(cu_k_ptr + seq)
        len_k = tl.load(cu_k_ptr + seq + 1) - k_start
        prefix = len_k - len_q  # tokens before this step's queries (cache hits, earlier chunks)

        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_mask = offs_m < len_q
        q_rows = (q_start + offs_m).to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        q = q.to(DOT_DTYPE)
        q_pos = prefix + offs_m  # absolute position of each query

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # log2(e): softmax in base 2. An fp8 cache's scales are applied to the scores and the
        # output, not to each K/V element (cache values cast exactly to q's dtype).
        qk_scale = scale * k_scale * 1.4426950408889634
        end = tl.minimum(len_k, prefix + (mb + 1) * BLOCK_M)
        for n0 in range(0, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            if PAGED:
                k, v = _load_paged_kv(
                    k_cache_ptr,
                    v_cache_ptr,
                    block_tables_ptr + seq * stride_bt,
                    offs_n,
                    n_mask,
                    offs_d,
                    kv_head,
                    stride_ckb,
                    stride_ckt,
                    stride_ckh,
                    stride_cvb,
                    stride_cvt,
                    stride_cvh,
                    stride_cvd,
                    BLOCK_SIZE,
                    BLOCK_N,
                    V_TOKEN_MINOR,
                    PLAIN_PAGE_LOAD,
                )
            else:
                rows = (k_start + offs_n).to(tl.int64)
                k = tl.load(
                    k_ptr + (rows * stride_kt + kv_head * stride_kh)[:, None] + offs_d[None, :],
                    mask=n_mask[:, None],
                    other=0.0,
                )
                v = tl.load(
                    v_ptr + (rows * stride_vt + kv_head * stride_vh)[:, None] + offs_d[None, :],
                    mask=n_mask[:, None],
                    other=0.0,
                )
            keep = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]  # causal
            m_i, l_i, acc = _softmax_tile(q, k, v, keep, m_i, l_i, acc, qk_scale, PRECISION)
        out = acc * (v_scale / l_i)[:, None]
        o_rows = (q_start + offs_m).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(
            o_ptr + o_rows[:, None] + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=m_mask[:, None],
        )

    @triton.jit(do_not_specialize=["stride_bt"])
    def _decode_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        context_lens_ptr,
        o_ptr,
        mid_o_ptr,
        mid_lse_ptr,
        prefix_o_ptr,
        prefix_lse_ptr,
        prefix_rows_ptr,
        prefix_len_ptr,
        scale,
        k_scale,
        v_scale,
        stride_qt,
        stride_qh,
        stride_ckb,
        stride_ckt,
        stride_ckh,
        stride_cvb,
        stride_cvt,
        stride_cvh,
        stride_cvd,
        stride_bt,
        stride_ot,
        stride_oh,
        G: tl.constexpr,
        G_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        V_TOKEN_MINOR: tl.constexpr,
        PLAIN_PAGE_LOAD: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        CASCADE: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        # One program per (sequence, KV head, split): the G query heads sharing this KV head
        # are the rows of one tile, so each K/V tile is read once for all of them. With
        # CASCADE (NUM_SPLITS == 1), a row that shares the prefix (prefix_rows) reads the keys
        # from the prefix's length on only: _shared_prefix_kernel attended to the prefix, and
        # its result is merged in at the end (a log-sum-exp of -inf for the other rows).
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(context_lens_ptr + seq)
        lo = tl.load(prefix_rows_ptr + seq) * tl.load(prefix_len_ptr) if CASCADE else 0
        split_len = tl.cdiv(tl.cdiv(ctx - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * split_len
        end = tl.minimum(start + split_len, ctx)

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        g_mask = offs_g < G
        heads = kv_head * G + offs_g
        q = tl.load(
            q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None],
            other=0.0,
        ).to(DOT_DTYPE)
        m_i, l_i, acc = _attend_paged(
            q, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, start, end, offs_d,
            kv_head, scale * k_scale, stride_ckb, stride_ckt, stride_ckh, stride_cvb, stride_cvt,
            stride_cvh, stride_cvd, G_PAD, D, BLOCK_SIZE, BLOCK_N, V_TOKEN_MINOR, PLAIN_PAGE_LOAD,
            PRECISION,
        )  # fmt: skip
        if CASCADE:
            # merge with the shared prefix's normalised output and log-sum-exp (base 2)
            at = seq * G * tl.num_programs(1) + heads  # [B, H]
            lse_p = tl.load(prefix_lse_ptr + at, mask=g_mask, other=float("-inf"))
            o_p = tl.load(prefix_o_ptr + at[:, None] * D + offs_d[None, :], mask=g_mask[:, None])
            nonempty = l_i > 0
            lse_s = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            top = tl.maximum(lse_p, lse_s)
            w_p = tl.exp2(lse_p - top)
            w_s = tl.exp2(lse_s - top)
            o_s = acc * (v_scale / tl.where(nonempty, l_i, 1.0))[:, None]
            out = (o_p * w_p[:, None] + o_s * w_s[:, None]) / (w_p + w_s)[:, None]
            tl.store(
                o_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                out.to(o_ptr.dtype.element_ty),
                mask=g_mask[:, None],
            )
        elif NUM_SPLITS == 1:
            out = acc * (v_scale / l_i)[:, None]
            tl.store(
                o_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                out.to(o_ptr.dtype.element_ty),
                mask=g_mask[:, None],
            )
        else:
            # Partial result of this split: normalised output and its log-sum-exp (base 2).
            nonempty = l_i > 0
            out = acc * (v_scale / tl.where(nonempty, l_i, 1.0))[:, None]
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            row = (seq * G * tl.num_programs(1) + heads) * NUM_SPLITS + split  # [B, H, S]
            tl.store(mid_o_ptr + row[:, None] * D + offs_d[None, :], out, mask=g_mask[:, None])
            tl.store(mid_lse_ptr + row, lse, mask=g_mask)

    @triton.jit(do_not_specialize=["num_seqs"])
    def _shared_prefix_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        table_ptr,
        o_ptr,
        lse_ptr,
        rows_ptr,
        prefix_len_ptr,
        num_seqs,
        scale,
        k_scale,
        v_scale,
        stride_qt,
        stride_qh,
        stride_ckb,
        stride_ckt,
        stride_ckh,
        stride_cvb,
        stride_cvt,
        stride_cvh,
        stride_cvd,
        G: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        V_TOKEN_MINOR: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
    ):
        """Cascade attention's first half: the decode rows' query heads of one KV head against
        the first *prefix_len_ptr tokens of the blocks at `table_ptr`, as one streaming softmax over
        tiles of BLOCK_M (row, head) pairs, so each shared K/V tile is read once per tile of
        rows rather than once per row. Writes each pair's normalised output (float32
        [num_seqs, H, D]) and log-sum-exp (base 2, [num_seqs, H]; -inf for the rows that do not
        share the prefix, `rows_ptr`), which `_decode_kernel` (CASCADE) merges with the rest of
        the row's context."""
        kv_head = tl.program_id(0)
        pairs = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = pairs < num_seqs * G
        seq = pairs // G
        heads = kv_head * G + pairs % G
        offs_d = tl.arange(0, D)
        q = tl.load(
            q_ptr + seq[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=m_mask[:, None],
            other=0.0,
        ).to(DOT_DTYPE)
        # PLAIN_PAGE_LOAD False: this kernel was not measured with it (docs/benchmarks.md)
        m_i, l_i, acc = _attend_paged(
            q, k_cache_ptr, v_cache_ptr, table_ptr, 0, tl.load(prefix_len_ptr), offs_d, kv_head,
            scale * k_scale, stride_ckb, stride_ckt, stride_ckh, stride_cvb, stride_cvt,
            stride_cvh, stride_cvd, BLOCK_M, D, BLOCK_SIZE, BLOCK_N, V_TOKEN_MINOR, False,
            PRECISION,
        )  # fmt: skip
        at = seq * G * tl.num_programs(0) + heads  # [B, H]
        # a row outside the prefix, or a prefix of 0 tokens: weight 0 (and a finite output)
        member = (tl.load(rows_ptr + seq, mask=m_mask, other=0) != 0) & (l_i > 0)
        l_safe = tl.where(member, l_i, 1.0)
        tl.store(o_ptr + at[:, None] * D + offs_d[None, :], acc * (v_scale / l_safe)[:, None],
                 mask=m_mask[:, None])  # fmt: skip
        tl.store(lse_ptr + at, tl.where(member, m_i + tl.log2(l_safe), float("-inf")), mask=m_mask)

    @triton.jit
    def _decode_reduce_kernel(
        mid_o_ptr,
        mid_lse_ptr,
        o_ptr,
        stride_ot,
        stride_oh,
        NUM_SPLITS: tl.constexpr,
        S_PAD: tl.constexpr,
        D: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        seq = tl.program_id(0)
        head = tl.program_id(1)
        row0 = (seq * tl.num_programs(1) + head) * NUM_SPLITS
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D)
        s_mask = offs_s < NUM_SPLITS
        lse = tl.load(mid_lse_ptr + row0 + offs_s, mask=s_mask, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, 0))
        w = tl.where(s_mask, w, 0.0)
        parts = tl.load(
            mid_o_ptr + (row0 + offs_s)[:, None] * D + offs_d[None, :],
            mask=s_mask[:, None],
            other=0.0,
        )
        out = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
        tl.store(
            o_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty)
        )


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs must not silently drop to tf32: the fp32 path is the exactness check.
    return "ieee" if dtype == torch.float32 else None


def _dot_dtype(q: torch.Tensor, cache: torch.Tensor, override: torch.dtype | None = None):
    """The dtype the attention dots run in: q's, except that 16-bit queries over an fp8 cache
    use fp16, whose cast from fp8 is one instruction per pair of values (bf16's takes a
    detour through fp32 on Hopper). Softmax and accumulation stay fp32."""
    dtype = override or (
        torch.float16 if fp8_max(cache) and q.dtype in (torch.bfloat16, torch.float16) else q.dtype
    )
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[
        dtype
    ]


def _scales_and_strides(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_scales: tuple[float, float]
) -> tuple:
    """The decode kernels' arguments from k_scale to stride_cvd: the caches' scales, q's token
    and head strides, K's block, token and head strides, and V's four."""
    return (
        *_cache_scales(k_cache, kv_scales),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        *v_cache.stride(),
    )


def _cache_scales(cache: torch.Tensor, kv_scales: tuple[float, float]) -> tuple[float, float]:
    """The scales the kernels apply: an fp8 cache's, 1.0 for caches in the model's dtype."""
    return (float(kv_scales[0]), float(kv_scales[1])) if fp8_max(cache) else (1.0, 1.0)


def plain_page_load(v_cache: torch.Tensor, block_n: int) -> bool:
    """Whether the prefill and decode kernels read each tile's page number outside the
    cp.async pipeline (`_load_paged_kv`'s PLAIN_PAGE_LOAD, inline PTX; a plain tl.load in the
    interpreter): for caches in the model's dtype, in blocks a whole number of tiles long (a
    tile then never crosses a block boundary: tiles start at multiples of block_n). The K/V copies
    then run num_stages - 1 tiles ahead, which measured faster for those caches; fp8 caches
    keep the one-tile pipeline, which measured faster for them (the deeper one costs a block
    per SM; docs/benchmarks.md, fourteenth session)."""
    return not fp8_max(v_cache) and v_cache.shape[1] % block_n == 0


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"triton attention needs a power-of-two head_dim >= 16, got {head_dim}")


def decode_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_context: int,
    device: torch.device,
    block_n: int,
    captured: bool = True,
) -> int:
    """Split the context so that small batches still put ~2 programs on every SM. Depends only
    on shapes, so a captured CUDA graph keeps a valid grid. The count is a compile-time
    constant of the kernel: an eager launch (not `captured`) rounds it down to a power of two,
    so that eager decoding compiles at most six variants, which start-up can compile (one
    sequence over block tables of 1, 2, 4, ... blocks takes every value an eager step can);
    a CUDA graph compiles its own at capture."""
    want = -(-2 * num_sms(device, otherwise=4) // max(1, num_seqs * num_kv_heads))
    splits = max(1, min(want, -(-max_context // (4 * block_n)), 32))
    return splits if captured else 1 << (splits.bit_length() - 1)


def eager_decode_widths(max_blocks: int) -> list[int]:
    """Block-table widths (1, 2, 4, ..., max_blocks) whose one-sequence decode steps launch,
    between them, every decode kernel variant an eager step with tables up to max_blocks wide
    can (`decode_num_splits`: the split count's power of two follows the widest table and
    shrinks with more sequences; doubling the width at most doubles it). What start-up runs
    without CUDA graphs."""
    widths = [1]
    while widths[-1] < max_blocks:
        widths.append(min(2 * widths[-1], max_blocks))
    return widths


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scales: tuple[float, float] = (1.0, 1.0),
    dot_dtype: torch.dtype | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """`kv_scales`: of fp8 caches; they apply only where K/V are read from the caches (with
    block tables), not to this step's own k and v. `dot_dtype` and the launch settings override
    the defaults (benchmarks/prefill_sweep.py)."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    _check_head_dim(head_dim)
    o = torch.empty_like(q)
    num_seqs = meta.cu_seqlens_q.shape[0] - 1
    paged = meta.block_tables is not None
    block_tables = meta.block_tables if paged else meta.cu_seqlens_q  # unused when not paged
    cache_k = k_cache if paged else k
    cache_v = v_cache if paged else v
    block_size = k_cache.shape[1] if paged else 1
    if q.device.type != "cuda":
        block_m, block_n = block_m or 16, block_n or 16
    else:
        block_m, block_n = block_m or 64, block_n or (64 if head_dim <= 64 else 32)
    grid = (q.shape[0] // block_m + num_seqs, num_heads)  # see _find_query_block
    _prefill_kernel[grid](
        q,
        k,
        v,
        cache_k,
        cache_v,
        o,
        meta.cu_seqlens_q,
        meta.cu_seqlens_k,
        block_tables,
        scale,
        *(_cache_scales(k_cache, kv_scales) if paged else (1.0, 1.0)),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cache_k.stride(0),
        cache_k.stride(1) if paged else 0,
        cache_k.stride(2) if paged else 0,
        *(v_cache.stride() if paged else (0, 0, 0, 1)),
        block_tables.stride(0),
        o.stride(0),
        o.stride(1),
        num_seqs,
        G=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        D=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        V_TOKEN_MINOR=paged and v_token_minor(v_cache),
        PLAIN_PAGE_LOAD=paged and plain_page_load(v_cache, block_n),
        PAGED=paged,
        PRECISION=_precision(q.dtype),
        DOT_DTYPE=_dot_dtype(q, cache_k, dot_dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return o


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Paged decode attention. The launch settings default to what benchmarks/decode_sweep.py
    chose on an H200 (`dot_dtype` overrides `_dot_dtype`'s choice, for that sweep). With
    `meta.shared_prefix`, cascade attention: the shared prefix once for the rows that share it
    (`_shared_prefix_kernel`), then each row's rest, merged (no split K)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    _check_head_dim(head_dim)
    g = num_heads // num_kv_heads
    on_gpu = q.device.type == "cuda"
    shared = meta.shared_prefix
    if shared is not None:
        if shared.rows.shape != (num_seqs,):
            raise ValueError(
                f"shared_prefix.rows must be [{num_seqs}], got {tuple(shared.rows.shape)}"
            )
        if num_splits not in (None, 1):
            raise ValueError(
                f"cascade attention runs unsplit: num_splits must be 1, got {num_splits}"
            )
        num_splits = 1
    # From decode_sweep.py on an H200 (docs/benchmarks.md). bf16 caches: 64-token tiles, 3
    # stages. fp8 caches (V token-minor): 128-token tiles, 3 stages, dots in fp16.
    fp8 = bool(fp8_max(k_cache))
    if block_n is None:
        block_n = (128 if fp8 else 64) if on_gpu else 16
    if num_stages is None:
        num_stages = 3 if on_gpu else 2
    if num_splits is None:
        max_context = meta.block_tables.shape[1] * block_size
        captured = on_gpu and torch.cuda.is_current_stream_capturing()
        num_splits = decode_num_splits(
            num_seqs, num_kv_heads, max_context, q.device, block_n, captured
        )
    pdl = use_pdl(q.device)
    o = torch.empty_like(q)
    if num_splits > 1:
        mid_o = torch.empty(
            num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        mid_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = o  # unused
    dot_dtype = _dot_dtype(q, k_cache, dot_dtype)
    if shared is not None:
        prefix_o, prefix_lse = _shared_prefix_attention(
            q, k_cache, v_cache, shared, scale, kv_scales, dot_dtype
        )
        prefix_rows, prefix_len = shared.rows, shared.length
    else:
        prefix_o = prefix_lse = prefix_rows = prefix_len = o  # unused
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.context_lens,
        o,
        mid_o,
        mid_lse,
        prefix_o,
        prefix_lse,
        prefix_rows,
        prefix_len,
        scale,
        *_scales_and_strides(q, k_cache, v_cache, kv_scales),
        meta.block_tables.stride(0),
        o.stride(0),
        o.stride(1),
        G=g,
        G_PAD=max(16, triton.next_power_of_2(g)),
        BLOCK_SIZE=block_size,
        D=head_dim,
        BLOCK_N=block_n,
        V_TOKEN_MINOR=v_token_minor(v_cache),
        PLAIN_PAGE_LOAD=plain_page_load(v_cache, block_n),
        NUM_SPLITS=num_splits,
        CASCADE=shared is not None,
        PRECISION=_precision(q.dtype),
        DOT_DTYPE=dot_dtype,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_kwargs(pdl),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            mid_o,
            mid_lse,
            o,
            o.stride(0),
            o.stride(1),
            NUM_SPLITS=num_splits,
            S_PAD=max(2, triton.next_power_of_2(num_splits)),
            D=head_dim,
            **pdl_kwargs(pdl),
        )
    return o


def _shared_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    shared: SharedPrefix,
    scale: float,
    kv_scales: tuple[float, float],
    dot_dtype: tl.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode rows' attention to their shared prefix: (normalised output float32 [rows, H,
    D], log-sum-exp base 2 [rows, H], -inf for rows outside it)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    g = num_heads // num_kv_heads
    on_gpu = q.device.type == "cuda"
    block_m = 64 if on_gpu else 16
    o = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_seqs, num_heads, dtype=torch.float32, device=q.device)
    _shared_prefix_kernel[(num_kv_heads, triton.cdiv(num_seqs * g, block_m))](
        q,
        k_cache,
        v_cache,
        shared.blocks,
        o,
        lse,
        shared.rows,
        shared.length,
        num_seqs,
        scale,
        *_scales_and_strides(q, k_cache, v_cache, kv_scales),
        G=g,
        BLOCK_SIZE=block_size,
        D=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=64 if on_gpu else 16,
        V_TOKEN_MINOR=v_token_minor(v_cache),
        PRECISION=_precision(q.dtype),
        DOT_DTYPE=dot_dtype,
        num_warps=4,
        num_stages=3 if on_gpu else 2,
    )
    return o, lse


class TritonAttentionBackend(AttentionBackend):
    """Default backend on CUDA. Runs on CPU only under TRITON_INTERPRET=1 (tests)."""

    name = "triton"
    shared_prefix_decode = True

    def prefill(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> Tensor:
        return prefill_attention(q, k, v, k_cache, v_cache, meta, scale, kv_scales)

    def decode(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> Tensor:
        return decode_attention(q, k_cache, v_cache, meta, scale, kv_scales=kv_scales)
