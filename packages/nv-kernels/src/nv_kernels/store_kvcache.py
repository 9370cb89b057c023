from __future__ import annotations

import torch

from nv_kernels.triton_utils import tl, triton


def store_kvcache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference: cache.view(-1, H, D)[slot] = key[t] for every token with slot >= 0."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(v_cache.dtype)


if triton is not None:

    @triton.jit
    def _store_kvcache_kernel(
        key_ptr,
        key_stride,
        value_ptr,
        value_stride,
        k_cache_ptr,
        v_cache_ptr,
        slot_mapping_ptr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per token; D = num_kv_heads * head_dim contiguous elements.
        t = tl.program_id(0)
        slot = tl.load(slot_mapping_ptr + t)
        if slot < 0:
            return
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        k = tl.load(key_ptr + t * key_stride + offs, mask=mask)
        v = tl.load(value_ptr + t * value_stride + offs, mask=mask)
        dst = slot.to(tl.int64) * D + offs
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value `[num_tokens, num_kv_heads, head_dim]` into the paged caches
    `[num_blocks, block_size, num_kv_heads, head_dim]` at `slot_mapping` (negative: skip)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    d = num_kv_heads * head_dim
    if key.stride(-1) != 1 or key.stride(1) != head_dim or value.stride(1) != head_dim:
        raise ValueError("store_kvcache needs each token's heads contiguous in key and value")
    if k_cache.stride(1) != d or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("store_kvcache needs contiguous caches")
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
        D=d,
        BLOCK=triton.next_power_of_2(d),
    )
