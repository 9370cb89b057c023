"""Triton kernels (interpreted on CPU) against the torch reference, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from nv_testing import decode_meta, paged_layout

from nv_kernels import AttentionMetadata, store_kvcache, store_kvcache_ref
from nv_kernels.torch_attention import TorchAttentionBackend, decode_ref, prefill_ref
from nv_kernels.triton_attention import decode_attention, prefill_attention


def _random_paged_batch(gen, lens_q, lens_k, block_size, num_kv_heads, head_dim, num_blocks):
    """Scatter each sequence's context into randomly chosen (non-contiguous) blocks."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots_ctx = [], []
    for len_k in lens_k:
        n = -(-len_k // block_size)
        blocks = [perm.pop() for _ in range(n)]
        tables.append(blocks)
        slots_ctx.append(
            [blocks[p // block_size] * block_size + p % block_size for p in range(len_k)]
        )
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return block_tables, slots_ctx


@pytest.mark.parametrize("block_size", [1, 4, 16, 17])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_store_kvcache_matches_reference(block_size, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(block_size * 10 + num_kv_heads)
    head_dim, num_blocks, n = 16, 40, 23
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(n, -1, head_dim)
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(n, -1, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].clone()
    slots[torch.rand(n, generator=gen) < 0.2] = -1  # padding tokens are skipped
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0) for _ in range(4)]
    store_kvcache(k, v, caches[0], caches[1], slots)
    store_kvcache_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert (caches[0] == 7.0).any()  # skipped slots untouched


# 24: tiles of 16 tokens (the interpreter's) that cross a block boundary
@pytest.mark.parametrize("block_size", [1, 4, 16, 5, 24])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (2, 2)])
def test_prefill_with_paged_context(block_size, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(block_size + num_heads)
    head_dim, num_blocks = 16, 64
    lens_q = [1, 7, block_size + 1, 20]
    lens_k = [1, 7 + 9, block_size + 1 + block_size - 1, 20 + 3]  # prefixes of 0, 9, bs-1, 3
    total_q = sum(lens_q)
    q = torch.randn(total_q, num_heads, head_dim, generator=gen)
    block_tables, slots_ctx = _random_paged_batch(
        gen, lens_q, lens_k, block_size, num_kv_heads, head_dim, num_blocks
    )
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    # This step's K/V are the last len_q tokens of each context.
    new_slots = [s[-lq:] for s, lq in zip(slots_ctx, lens_q, strict=True)]
    slot_mapping = torch.tensor([x for s in new_slots for x in s], dtype=torch.int64)
    k = torch.randn(total_q, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(total_q, num_kv_heads, head_dim, generator=gen)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        True, slot_mapping, None, block_tables, cu_q, cu_k, max(lens_q), max(lens_k)
    )
    ref = prefill_ref(q, k, v, k_cache, v_cache, meta, 0.25)
    out = prefill_attention(q, k, v, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prefill_without_cache_matches_reference():
    gen = torch.Generator().manual_seed(3)
    lens = [5, 1, 33]
    q = torch.randn(sum(lens), 4, 32, generator=gen)
    k = torch.randn(sum(lens), 2, 32, generator=gen)
    v = torch.randn(sum(lens), 2, 32, generator=gen)
    cu = torch.tensor([0, 5, 6, 39], dtype=torch.int32)
    meta = AttentionMetadata(True, torch.full((39,), -1), None, None, cu, cu, 33, 33)
    empty = torch.empty(0)
    ref = prefill_ref(q, k, v, empty, empty, meta, 0.2)
    out = prefill_attention(q, k, v, empty, empty, meta, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 16, 7, 24])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 2), (2, 2)])
def test_decode_matches_reference(block_size, num_splits, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(block_size * 7 + num_splits)
    head_dim, num_blocks = 16, 96
    lens = [1, block_size - 1 or 1, block_size, block_size + 1, 40]
    block_tables, _ = _random_paged_batch(
        gen, lens, lens, block_size, num_kv_heads, head_dim, num_blocks
    )
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    meta = decode_meta(lens, block_tables)
    ref = decode_ref(q, k_cache, v_cache, meta, 0.3)
    out = decode_attention(q, k_cache, v_cache, meta, 0.3, num_splits=num_splits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [16, 7])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 2), (2, 2)])
@pytest.mark.parametrize("prefix_blocks", [1, 3])
def test_decode_with_a_shared_prefix_matches_reference(
    block_size, num_heads, num_kv_heads, prefix_blocks
):
    # cascade attention: rows whose tables start with the same blocks attend to them once,
    # then to their own rest; rows with no tokens past the prefix but the newest one, rows that
    # do not share it (every third: their own copy of it, as requests prefilled in one step
    # hold), more (row, head) pairs than a query tile (16 on CPU) holds, 3 heads per KV head
    gen = torch.Generator().manual_seed(block_size * 5 + prefix_blocks + num_heads)
    head_dim, num_blocks, rows = 16, 160, 11
    prefix = prefix_blocks * block_size
    shared = torch.randperm(num_blocks, generator=gen)[:prefix_blocks].tolist()
    free = [b for b in torch.randperm(num_blocks, generator=gen).tolist() if b not in shared]
    lens, tables, members = [], [], []
    for i in range(rows):
        ctx = prefix + 1 + (i * 5) % (3 * block_size)
        own = -(-ctx // block_size) - prefix_blocks
        member = i % 3 != 1
        start = shared if member else [free.pop() for _ in shared]
        tables.append(start + [free.pop() for _ in range(own)])
        lens.append(ctx)
        members.append(int(member))
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = torch.randn(rows, num_heads, head_dim, generator=gen)
    # the blocks in a wider buffer, as the graphs hold them
    meta = decode_meta(lens, block_tables, (prefix, shared + [0, 0], members))
    ref = decode_ref(q, k_cache, v_cache, meta, 0.3)
    out = decode_attention(q, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # a CUDA graph's step without a shared prefix: length 0, no row in it
    meta.shared_prefix.length.zero_()
    meta.shared_prefix.rows.zero_()
    out = decode_attention(q, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, k_cache, v_cache, meta, 0.3, num_splits=3)
    with pytest.raises(ValueError, match="shared_prefix.rows"):
        meta.shared_prefix = meta.shared_prefix._replace(rows=meta.shared_prefix.rows[1:])
        decode_attention(q, k_cache, v_cache, meta, 0.3)


def test_torch_backend_writes_cache_then_attends():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.zeros(4, 2, 1, 16)
    v_cache = torch.zeros(4, 2, 1, 16)
    q, k, v = (torch.randn(3, 1, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 3], dtype=torch.int32)
    meta = AttentionMetadata(
        True, torch.tensor([6, 7, 2]), None, torch.tensor([[3, 1]], dtype=torch.int32), cu, cu, 3, 3
    )
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 1.0)
    assert torch.equal(k_cache[3, 0, 0], k[0, 0]) and torch.equal(k_cache[1, 0, 0], k[2, 0])
    # Token 0 attends only to itself: its output is its own value.
    torch.testing.assert_close(out[0], v[0])


@pytest.mark.parametrize("paged", [True, False])
def test_prefill_grid_covers_skewed_lengths(paged):
    # one long chunk beside one-token rows (a mixed step's decode rows), lengths at, just under
    # and just over the CPU query block (16), and an empty-prefix one: every query of every
    # sequence is computed once (the grid follows the total tokens, see _find_query_block)
    gen = torch.Generator().manual_seed(21)
    heads, hkv, d, bs, blocks = 4, 2, 16, 8, 128
    lens_q = [1, 70, 1, 16, 15, 17, 1, 32, 1]
    prefix = [40, 0, 9, 0, 3, 0, 23, 0, 1] if paged else [0] * len(lens_q)
    lens_k = [q + p for q, p in zip(lens_q, prefix, strict=True)]
    table, slot_lists = paged_layout(gen, lens_k, bs, blocks)
    q = torch.randn(sum(lens_q), heads, d, generator=gen)
    shape = (blocks, bs, hkv, d)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    new = [s[-lq:] for s, lq in zip(slot_lists, lens_q, strict=True)]
    slots = torch.tensor([x for s in new for x in s])
    k = torch.randn(len(slots), hkv, d, generator=gen)
    v = torch.randn(len(slots), hkv, d, generator=gen)
    store_kvcache_ref(k, v, k_cache, v_cache, slots)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        True, slots, None, table if paged else None, cu_q, cu_q if not paged else cu_k,
        max(lens_q), max(lens_k),
    )  # fmt: skip
    out = prefill_attention(q, k, v, k_cache, v_cache, meta, 0.25)
    ref = prefill_ref(q, k, v, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "block_size,block_n,kv_heads,max_blocks,sms",
    [(16, 64, 8, 256, 132), (256, 64, 8, 16, 132), (256, 128, 4, 17, 132), (48, 64, 2, 100, 20)],
)
def test_eager_decode_warm_up_covers_every_split_count(
    monkeypatch, block_size, block_n, kv_heads, max_blocks, sms
):
    # The split count is a compile-time constant of the decode kernel: eager launches round it
    # to a power of two, and start-up's one-sequence steps over eager_decode_widths must take
    # every value a step of any batch size and table width can (else a step compiles)
    from nv_kernels import eager_decode_widths, triton_attention

    monkeypatch.setattr(triton_attention, "num_sms", lambda device, otherwise: sms)
    cpu = torch.device("cpu")

    def splits(seqs: int, width: int, captured: bool = False) -> int:
        ctx = width * block_size
        return triton_attention.decode_num_splits(seqs, kv_heads, ctx, cpu, block_n, captured)

    warmed = {splits(1, w) for w in eager_decode_widths(max_blocks)}
    taken = {splits(b, w) for b in range(1, 300) for w in range(1, max_blocks + 1)}
    assert taken <= warmed
    assert all(s & (s - 1) == 0 for s in taken) and len(warmed) <= 6
    # a captured launch keeps the exact count (the graphs' tuning is unchanged)
    exact = {splits(b, max_blocks, captured=True) for b in range(1, 40)}
    assert exact - taken, "some captured count is not a power of two"
