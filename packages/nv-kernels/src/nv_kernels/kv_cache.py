"""The paged KV cache's memory layout, which every kernel and backend here reads through strides.

A layer's K and V caches are both indexed [block, token in block, KV head, head dim]. K is
stored in that order (head_dim-minor). V is too in 16-bit caches; fp8 caches store V
token-minor, [block, KV head, head dim, token in block], and hand out the permuted view. The
attention kernels multiply p·V with V as the dot's second operand, reduced over tokens: stored
token-minor, an fp8 V tile goes from memory to shared memory to the tensor cores with no
transpose, which 8-bit elements have no hardware instruction for. 16-bit V keeps the plain
layout: `ldmatrix.trans` transposes it on the way (docs/benchmarks.md has both measured).
"""

from __future__ import annotations

import torch

from nv_kernels.store_kvcache import FP8_KV_DTYPES


def stores_v_token_minor(dtype: torch.dtype) -> bool:
    """Whether caches of `dtype` store V token-minor (fp8 ones do)."""
    return dtype in FP8_KV_DTYPES


def v_token_minor(v_cache: torch.Tensor) -> bool:
    """Whether a V cache [blocks, block_size, KV heads, head_dim] is stored token-minor."""
    return v_cache.dim() == 4 and v_cache.shape[1] > 1 and v_cache.stride(1) == 1


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed K and V caches for every layer, each [num_layers, num_blocks, block_size,
    num_kv_heads, head_dim] as indexed (the layout above); `k[i]`, `v[i]` are layer i's."""
    shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.zeros(shape, dtype=dtype, device=device)
    if stores_v_token_minor(dtype):
        stored = (num_layers, num_blocks, num_kv_heads, head_dim, block_size)
        v = torch.zeros(stored, dtype=dtype, device=device).permute(0, 1, 4, 2, 3)
    else:
        v = torch.zeros(shape, dtype=dtype, device=device)
    return k, v
