"""fp8 KV caches (e4m3, and e5m2 for the store and attention): the Triton store, fused
rope+store and attention kernels (interpreted on CPU) against the torch reference, which
quantizes and dequantizes with torch's own casts."""

from __future__ import annotations

import pytest
import torch
from nv_testing import assert_fp8_cache_equal, decode_meta, paged_layout

from nv_kernels import (
    AttentionMetadata,
    allocate_kv_cache,
    dequantize_kv,
    qk_norm_rope_store,
    quantize_kv,
    store_kvcache,
    store_kvcache_ref,
)
from nv_kernels.torch_attention import decode_ref, prefill_ref
from nv_kernels.triton_attention import decode_attention, prefill_attention

FP8 = torch.float8_e4m3fn
FP8S = [torch.float8_e4m3fn, torch.float8_e5m2]
SCALES = [(1.0, 1.0), (0.05, 3.0)]
# V head_dim-minor, as 16-bit caches store it, or token-minor, as the engine's fp8 caches do
V_LAYOUTS = ["head-dim-minor", "token-minor"]


def fp8_caches(shape, dtype, v_layout, gen=None):
    """K and V caches [blocks, block_size, KV heads, head_dim] with V in `v_layout`: zeroed, or
    with `gen`, random normal values quantized (scale 1)."""
    if v_layout == "token-minor":
        k, v = allocate_kv_cache(1, *shape, dtype, "cpu")
        assert v[0].stride(1) == 1  # what the kernels key on
        k, v = k[0], v[0]
    else:
        k, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    if gen is not None:
        for cache in (k, v):
            cache.copy_(quantize_kv(torch.randn(shape, generator=gen), cache, 1.0))
    return k, v


def test_quantize_saturates_and_rounds_like_torch():
    cache = torch.empty(0, dtype=FP8)
    x = torch.tensor([0.0, 1.0, -2.7, 1000.0, -1e4, 500.0, 0.3])
    q = quantize_kv(x, cache, 2.0)
    assert q.dtype == FP8
    back = dequantize_kv(q, torch.float32, 2.0)
    # saturated at ±448 * scale, never NaN (torch's plain cast of 1e4 / 2 gives NaN)
    assert back.tolist()[3:6] == [896.0, -896.0, 512.0]
    assert not back.isnan().any()
    torch.testing.assert_close(back[[0, 1, 2, 6]], x[[0, 1, 2, 6]], rtol=0.07, atol=0)


@pytest.mark.parametrize("v_layout", V_LAYOUTS)
@pytest.mark.parametrize("kv_scales", SCALES)
@pytest.mark.parametrize("dtype", FP8S)
def test_store_kvcache_fp8_matches_reference(kv_scales, dtype, v_layout):
    gen = torch.Generator().manual_seed(1)
    n, hkv, d, blocks, bs = 19, 2, 16, 8, 4
    fp8_max = torch.finfo(dtype).max
    k = torch.randn(n, hkv, d, generator=gen) * fp8_max / 2  # some values past max * k_scale
    v = torch.randn(n, hkv, d, generator=gen)
    slots = torch.randperm(blocks * bs, generator=gen)[:n].clone()
    slots[3] = -1
    caches = [
        *fp8_caches((blocks, bs, hkv, d), dtype, v_layout),
        *fp8_caches((blocks, bs, hkv, d), dtype, "head-dim-minor"),
    ]
    store_kvcache(k, v, caches[0], caches[1], slots, *kv_scales)
    store_kvcache_ref(k, v, caches[2], caches[3], slots, *kv_scales)
    for ours, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert_fp8_cache_equal(ours, ref)
    assert caches[0].float().abs().max() == fp8_max  # saturated, not NaN


@pytest.mark.parametrize("dtype", FP8S)
def test_fp8_stores_never_write_nan(dtype):
    # what the attention kernels' token-minor V loads rely on: a cache holds no NaN (e5m2: no
    # Inf either), whatever the model hands the store. Both store kernels saturate NaN and
    # infinities to the finite range.
    k = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 4).view(1, 1, 16)
    v = k.flip(-1).clone()
    caches = fp8_caches((2, 4, 1, 16), dtype, "token-minor")
    store_kvcache(k, v, *caches, torch.tensor([5]), 0.5, 2.0)
    qkv = torch.cat([torch.randn(1, 16), k[0], v[0]], dim=-1)  # 1 query head, 1 KV head
    qk_norm_rope_store(
        qkv, torch.randn(1, 16), None, None, 1e-6, 1, 1, *caches, torch.tensor([2]), 0.5, 2.0
    )
    for cache in caches:
        written = cache[[1, 0], [1, 2]].float()  # slots 5 and 2
        assert written.isfinite().all(), written
    # V as handed over (K is normed and rotated in the fused store): the specials saturated
    special = ~v[0].isfinite()
    assert (caches[1][[1, 0], [1, 2]].float().abs()[:, special] == torch.finfo(dtype).max).all()


@pytest.mark.parametrize("v_layout", V_LAYOUTS)
@pytest.mark.parametrize("kv_scales", SCALES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", FP8S)
def test_decode_fp8_cache_matches_reference(kv_scales, num_splits, q_dtype, dtype, v_layout):
    gen = torch.Generator().manual_seed(num_splits)
    heads, hkv, d, bs, blocks = 4, 2, 16, 4, 48
    lens = [1, 5, 17, 33]
    table, slots = paged_layout(gen, lens, bs, blocks - 1)
    for i, n in enumerate(lens):  # no sequence owns block 0, where masked tokens point
        table[i, : -(-n // bs)] += 1
    slots = [[slot + bs for slot in seq] for seq in slots]
    shape = (blocks, bs, hkv, d)
    k_cache, v_cache = fp8_caches(shape, dtype, v_layout, gen)
    q = torch.randn(len(lens), heads, d, generator=gen).to(q_dtype)
    meta = decode_meta(lens, table)
    ref = decode_ref(q.float(), k_cache, v_cache, meta, 0.3, kv_scales)
    plain = decode_ref(q.float(), k_cache, v_cache, meta, 0.3)
    # then every slot no sequence owns holds garbage: K a NaN byte (in e4m3fn and e5m2 alike),
    # masked at the load. V: a NaN byte in the head_dim-minor layout (loaded unmasked, its
    # masked rows zeroed after the cast); the largest finite value in the token-minor one,
    # which is loaded whole and relies on the store never writing NaN (below), so that masked
    # tokens' weights of 0 cancel it. Triton's interpreter decodes e4m3fn's NaN as 480, so there
    # the NaN cases check that masked tokens carry no weight; tests/gpu checks the NaN itself
    unused = torch.ones(blocks * bs, dtype=torch.bool)
    unused[[slot for seq in slots for slot in seq]] = False
    unused = unused.nonzero()[:, 0]
    largest = quantize_kv(torch.tensor(1e9), v_cache, 1.0).view(torch.uint8)
    for cache, byte in ((k_cache, 0x7F), (v_cache, largest if v_layout == "token-minor" else 0x7F)):
        cache.view(torch.uint8)[unused // bs, unused % bs] = byte
    out = decode_attention(
        q, k_cache, v_cache, meta, 0.3, num_splits=num_splits, kv_scales=kv_scales
    )
    # 16-bit queries: the dots run in fp16 (q rounded to it, then bf16 output)
    tol = 1e-5 if q_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    # the scales matter: the same cache read as if unscaled gives another result
    if kv_scales != (1.0, 1.0):
        assert not torch.allclose(plain, ref, atol=1e-3)


@pytest.mark.parametrize("v_layout", V_LAYOUTS)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", FP8S)
def test_decode_fp8_cache_with_a_shared_prefix_matches_reference(q_dtype, v_layout, dtype):
    # cascade attention over an fp8 cache (e4m3 and e5m2): the shared blocks once for the
    # batch, then each row's own, merged; scaled
    gen = torch.Generator().manual_seed(3)
    heads, hkv, d, bs, blocks, kv_scales = 4, 2, 16, 16, 24, (0.05, 3.0)
    shared = [5, 2]
    lens = [2 * bs + 1, 2 * bs + 7, 3 * bs + 2, 2 * bs + 16]
    own = iter([b for b in range(1, blocks) if b not in shared])
    table = torch.tensor(
        [shared + [next(own) for _ in range(-(-n // bs) - 2)] + [0] * (4 - -(-n // bs))
         for n in lens],
        dtype=torch.int32,
    )  # fmt: skip
    shape = (blocks, bs, hkv, d)
    k_cache, v_cache = fp8_caches(shape, dtype, v_layout, gen)
    q = torch.randn(len(lens), heads, d, generator=gen).to(q_dtype)
    meta = decode_meta(lens, table, (2 * bs, shared, [1] * len(lens)))
    ref = decode_ref(q.float(), k_cache, v_cache, meta, 0.3, kv_scales)
    out = decode_attention(q, k_cache, v_cache, meta, 0.3, kv_scales=kv_scales)
    tol = 1e-5 if q_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("v_layout", V_LAYOUTS)
@pytest.mark.parametrize("kv_scales", SCALES)
@pytest.mark.parametrize("dtype", FP8S)
def test_prefill_fp8_paged_context_matches_reference(kv_scales, dtype, v_layout):
    gen = torch.Generator().manual_seed(5)
    heads, hkv, d, bs, blocks = 4, 2, 16, 4, 48
    lens_q, lens_k = [3, 8, 1], [3, 8 + 9, 1 + 4]  # prefixes of 0, 9 and 4 cached tokens
    table, slot_lists = paged_layout(gen, lens_k, bs, blocks)
    slots = torch.tensor([x for row in slot_lists for x in row])
    shape = (blocks, bs, hkv, d)
    k_cache, v_cache = fp8_caches(shape, dtype, v_layout)
    # the whole context goes through the store, as chunked prefill and prefix hits leave it
    k_all = torch.randn(len(slots), hkv, d, generator=gen)
    v_all = torch.randn(len(slots), hkv, d, generator=gen)
    store_kvcache_ref(k_all, v_all, k_cache, v_cache, slots, *kv_scales)
    ends = torch.tensor(lens_k).cumsum(0).tolist()
    new = torch.cat([torch.arange(e - lq, e) for e, lq in zip(ends, lens_q, strict=True)])
    q = torch.randn(sum(lens_q), heads, d, generator=gen)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *ends], dtype=torch.int32)
    meta = AttentionMetadata(True, slots[new], None, table, cu_q, cu_k, max(lens_q), max(lens_k))
    args = (q, k_all[new], v_all[new], k_cache, v_cache, meta, 0.25, kv_scales)
    torch.testing.assert_close(prefill_attention(*args), prefill_ref(*args), atol=1e-5, rtol=1e-5)
