"""Everything between the QKV projection and attention, in one kernel: per-head RMSNorm on q and
k (Qwen3; optional), neox rotary on q and k, and the K/V store into the paged cache.

Unfused these are two kernels per layer (a compiled norm+rotary and `store_kvcache`), whose cost
at batch 1 is mostly launch and ramp time (docs/benchmarks.md has the measurement).
"""

from __future__ import annotations

import torch

from nv_kernels.pdl import pdl_kwargs, pdl_wait, use_pdl
from nv_kernels.rms_norm import rms_norm_ref
from nv_kernels.store_kvcache import cache_strides, check_k_cache, fp8_max, store_kvcache_ref
from nv_kernels.triton_utils import tl, triton


def _norm_rotate_torch(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    if weight is not None:
        x = rms_norm_ref(x, weight, eps)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _split(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    t = qkv.shape[0]
    return (
        q.view(t, num_heads, head_dim),
        k.view(t, num_kv_heads, head_dim),
        v.view(t, num_kv_heads, head_dim),
    )


def qk_norm_rope(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch: qkv `[T, (H + 2 Hkv) D]` -> q `[T, H, D]`, k, v `[T, Hkv, D]`, with per-head RMSNorm
    on q and k (when the weights are given) and neox rotary by `cos_sin` `[T, D]` (cos | sin
    halves), in float32 with Hugging Face's roundings. q and k are new tensors, v is a view of qkv.
    The models' path where `qk_norm_rope_store` does not run, and its reference."""
    q, k, v = _split(qkv, num_heads, num_kv_heads, head_dim)
    cos, sin = cos_sin[:, None].chunk(2, dim=-1)
    return (
        _norm_rotate_torch(q, cos, sin, q_weight, eps),
        _norm_rotate_torch(k, cos, sin, k_weight, eps),
        v,
    )


def qk_norm_rope_store_ref(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    num_heads: int,
    num_kv_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of `qk_norm_rope_store` (the same contract, eager)."""
    head_dim = k_cache.shape[-1]
    args = (q_weight, k_weight, eps, num_heads, num_kv_heads, head_dim)
    new_q, new_k, v = qk_norm_rope(qkv, cos_sin, *args)
    q, k, _ = _split(qkv, num_heads, num_kv_heads, head_dim)
    q.copy_(new_q)
    k.copy_(new_k)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k, v


if triton is not None:
    from nv_kernels.store_kvcache import slot_starts, to_cache

    @triton.jit
    def _norm_rotate(
        x1, x2, cos, sin, w_ptr, offs_d, eps, HALF: tl.constexpr, HAS_NORM: tl.constexpr
    ):
        """x1, x2: the two halves [heads, HALF] of some heads, in their storage dtype. Returns the
        rotated halves in float32, with the storage dtype's roundings of `_norm_rotate_torch`."""
        dtype = x1.dtype
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        if HAS_NORM:
            r = tl.rsqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / (2 * HALF) + eps)[:, None]
            w1 = tl.load(w_ptr + offs_d).to(tl.float32)[None, :]
            w2 = tl.load(w_ptr + HALF + offs_d).to(tl.float32)[None, :]
            a = (w1 * (a * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            b = (w2 * (b * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        return a * cos - b * sin, b * cos + a * sin

    @triton.jit
    def _qk_norm_rope_store_kernel(
        qkv_ptr,
        stride_t,
        cos_sin_ptr,
        stride_cs,
        q_w_ptr,
        k_w_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_mapping_ptr,
        eps,
        k_scale,
        v_scale,
        stride_kb,
        stride_kt,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_vd,
        H: tl.constexpr,
        HKV: tl.constexpr,
        H_PAD: tl.constexpr,
        HKV_PAD: tl.constexpr,
        HALF: tl.constexpr,
        HAS_NORM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        FP8_MAX: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        # Program (t, 0): token t's H query heads; (t, 1): its HKV key and value heads (two
        # programs per token keep the dependent chain short when a decode step has few tokens).
        t = tl.program_id(0).to(tl.int64)
        D: tl.constexpr = 2 * HALF
        offs_d = tl.arange(0, HALF)
        row = qkv_ptr + t * stride_t
        cos = tl.load(cos_sin_ptr + t * stride_cs + offs_d)[None, :]
        sin = tl.load(cos_sin_ptr + t * stride_cs + HALF + offs_d)[None, :]
        dtype = qkv_ptr.dtype.element_ty

        if tl.program_id(1) == 0:
            hq = tl.arange(0, H_PAD)[:, None]
            q_ptrs = row + hq * D + offs_d[None, :]
            q_mask = hq < H
            q1, q2 = _norm_rotate(
                tl.load(q_ptrs, mask=q_mask, other=0.0),
                tl.load(q_ptrs + HALF, mask=q_mask, other=0.0),
                cos, sin, q_w_ptr, offs_d, eps, HALF, HAS_NORM,
            )  # fmt: skip
            tl.store(q_ptrs, q1.to(dtype), mask=q_mask)
            tl.store(q_ptrs + HALF, q2.to(dtype), mask=q_mask)
            return

        hk = tl.arange(0, HKV_PAD)[:, None]
        k_ptrs = row + H * D + hk * D + offs_d[None, :]
        kv_mask = hk < HKV
        k1, k2 = _norm_rotate(
            tl.load(k_ptrs, mask=kv_mask, other=0.0),
            tl.load(k_ptrs + HALF, mask=kv_mask, other=0.0),
            cos, sin, k_w_ptr, offs_d, eps, HALF, HAS_NORM,
        )  # fmt: skip
        k1, k2 = k1.to(dtype), k2.to(dtype)
        tl.store(k_ptrs, k1, mask=kv_mask)
        tl.store(k_ptrs + HALF, k2, mask=kv_mask)

        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        if slot >= 0:
            v_ptrs = k_ptrs + HKV * D
            v1 = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            v2 = tl.load(v_ptrs + HALF, mask=kv_mask, other=0.0)
            k_dst, v_dst = slot_starts(slot, stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE)
            k_dst += hk * D + offs_d[None, :]
            v_dst += hk * stride_vh + offs_d[None, :] * stride_vd
            ty = k_cache_ptr.dtype.element_ty
            tl.store(k_cache_ptr + k_dst, to_cache(k1, k_scale, ty, FP8_MAX), mask=kv_mask)
            tl.store(k_cache_ptr + k_dst + HALF, to_cache(k2, k_scale, ty, FP8_MAX), mask=kv_mask)
            tl.store(v_cache_ptr + v_dst, to_cache(v1, v_scale, ty, FP8_MAX), mask=kv_mask)
            v_dst += HALF * stride_vd
            tl.store(v_cache_ptr + v_dst, to_cache(v2, v_scale, ty, FP8_MAX), mask=kv_mask)


def qk_norm_rope_store(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    num_heads: int,
    num_kv_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv `[T, (H + 2 Hkv) D]` (the QKV projection's output, contiguous): normalise q and k per
    head when the weights are given (both or neither), rotate them by `cos_sin` `[T, D]` (float32,
    cos | sin halves), in place, and write k and v into the caches `[num_blocks, block_size, Hkv,
    D]` (V at any strides: kv_cache.py) at `slot_mapping` (negative: skip). Returns views q
    `[T, H, D]`, k, v `[T, Hkv, D]` of `qkv`."""
    t, width = qkv.shape
    head_dim = k_cache.shape[-1]
    if width != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(-1) != 1:
        raise ValueError(
            f"qkv must be [T, (H + 2 Hkv) * D] with a contiguous last dim, got {tuple(qkv.shape)}"
        )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("give both q and k norm weights or neither")
    check_k_cache(k_cache)
    if t:
        _qk_norm_rope_store_kernel[(t, 2)](
            qkv,
            qkv.stride(0),
            cos_sin,
            cos_sin.stride(0),
            q_weight if q_weight is not None else qkv,
            k_weight if k_weight is not None else qkv,
            k_cache,
            v_cache,
            slot_mapping,
            eps,
            k_scale,
            v_scale,
            *cache_strides(k_cache, v_cache),
            H=num_heads,
            HKV=num_kv_heads,
            H_PAD=triton.next_power_of_2(num_heads),
            HKV_PAD=triton.next_power_of_2(num_kv_heads),
            HALF=head_dim // 2,
            HAS_NORM=q_weight is not None,
            BLOCK_SIZE=k_cache.shape[1],
            FP8_MAX=fp8_max(k_cache),
            num_warps=4,
            **pdl_kwargs(use_pdl(qkv.device)),
        )
    return _split(qkv, num_heads, num_kv_heads, head_dim)


def use_qk_norm_rope_store(qkv: torch.Tensor, k_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether `qk_norm_rope_store` can take this layer's step: on CUDA, with a KV cache, a
    contiguous qkv and a power-of-two head dim."""
    return (
        qkv.is_cuda
        and triton is not None
        and k_cache.numel() > 0
        and qkv.is_contiguous()
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
    )
