from __future__ import annotations

import torch

from nv_kernels.triton_utils import tl, triton

FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_max(cache: torch.Tensor) -> float:
    """The largest finite value of an fp8 cache's dtype, or 0.0 for a cache in another dtype
    (the kernels' switch: 0 stores values as they are)."""
    return torch.finfo(cache.dtype).max if cache.dtype in FP8_KV_DTYPES else 0.0


def quantize_kv(x: torch.Tensor, cache: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` in the cache's dtype. An fp8 cache holds x / scale, saturated to its finite range and
    rounded to nearest even (what the kernels store); other caches hold x cast."""
    m = fp8_max(cache)
    if m:
        return (x.float() / scale).clamp(-m, m).to(cache.dtype)
    return x.to(cache.dtype)


def check_k_cache(k_cache: torch.Tensor) -> None:
    """The store kernels write each token's K heads as one contiguous row."""
    _, _, num_kv_heads, head_dim = k_cache.shape
    if k_cache.stride(3) != 1 or k_cache.stride(2) != head_dim:
        raise ValueError(
            "the K cache must hold each token's heads contiguously: [blocks, block_size, "
            f"{num_kv_heads}, {head_dim}] with strides (..., ..., {head_dim}, 1), got "
            f"{k_cache.stride()}"
        )


def cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    """The store kernels' stride arguments: K's block and token strides, then V's four."""
    return (k_cache.stride(0), k_cache.stride(1), *v_cache.stride())


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cached values back in `dtype` (fp8: times `scale`)."""
    if x.dtype in FP8_KV_DTYPES:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


def store_kvcache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Torch reference: cache[slot // block_size, slot % block_size] = key[t] for every token
    with slot >= 0 (quantized as `quantize_kv` says), whatever the caches' strides."""
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    blocks, offsets = slot_mapping[valid] // block_size, slot_mapping[valid] % block_size
    k_cache[blocks, offsets] = quantize_kv(key[valid], k_cache, k_scale)
    v_cache[blocks, offsets] = quantize_kv(value[valid], v_cache, v_scale)


if triton is not None:

    @triton.jit
    def to_cache(x, scale, cache_ty: tl.constexpr, FP8_MAX: tl.constexpr):
        """x as the cache stores it: for fp8 (FP8_MAX > 0) x / scale in float32, clamped to the
        finite range, then rounded to nearest even (as torch's cast does); else x cast."""
        if FP8_MAX > 0:
            y = x.to(tl.float32) / scale
            return tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX).to(cache_ty)
        else:
            return x.to(cache_ty)

    @triton.jit
    def slot_starts(slot, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE: tl.constexpr):
        """Where cache slot `slot` (block * BLOCK_SIZE + token in block) starts in K's cache and
        in V's, whose strides are their own (kv_cache.py: token-minor in fp8 caches)."""
        block = slot // BLOCK_SIZE
        in_block = slot % BLOCK_SIZE
        return block * stride_kb + in_block * stride_kt, block * stride_vb + in_block * stride_vt

    @triton.jit
    def _store_kvcache_kernel(
        key_ptr,
        key_stride,
        value_ptr,
        value_stride,
        k_cache_ptr,
        v_cache_ptr,
        slot_mapping_ptr,
        k_scale,
        v_scale,
        stride_kb,
        stride_kt,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_vd,
        HEAD_DIM: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        FP8_MAX: tl.constexpr,
    ):
        # One program per token; D = num_kv_heads * head_dim elements, contiguous in K's cache,
        # at V's strides in V's (kv_cache.py: token-minor in fp8 caches).
        t = tl.program_id(0)
        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        if slot < 0:
            return
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        k = tl.load(key_ptr + t * key_stride + offs, mask=mask)
        v = tl.load(value_ptr + t * value_stride + offs, mask=mask)
        k_dst, v_dst = slot_starts(slot, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE)
        k_dst += offs
        v_dst += (offs // HEAD_DIM) * stride_vh + (offs % HEAD_DIM) * stride_vd
        cache_ty = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + k_dst, to_cache(k, k_scale, cache_ty, FP8_MAX), mask=mask)
        tl.store(v_cache_ptr + v_dst, to_cache(v, v_scale, cache_ty, FP8_MAX), mask=mask)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write key/value `[num_tokens, num_kv_heads, head_dim]` into the paged caches
    `[num_blocks, block_size, num_kv_heads, head_dim]` at `slot_mapping` (negative: skip). fp8
    caches get value / scale, saturated (`quantize_kv`). K's cache holds each token's heads
    contiguously; V's may have any strides (kv_cache.py)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    d = num_kv_heads * head_dim
    if key.stride(-1) != 1 or key.stride(1) != head_dim or value.stride(1) != head_dim:
        raise ValueError("store_kvcache needs each token's heads contiguous in key and value")
    check_k_cache(k_cache)
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key,
        key.stride(0),
        value,
        value.stride(0),
        k_cache,
        v_cache,
        slot_mapping,
        k_scale,
        v_scale,
        *cache_strides(k_cache, v_cache),
        HEAD_DIM=head_dim,
        D=d,
        BLOCK=triton.next_power_of_2(d),
        BLOCK_SIZE=k_cache.shape[1],
        FP8_MAX=fp8_max(k_cache),
    )
