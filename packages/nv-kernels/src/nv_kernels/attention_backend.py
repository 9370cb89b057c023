from __future__ import annotations

import torch

from nv_kernels.metadata import AttentionMetadata
from nv_kernels.store_kvcache import store_kvcache


class AttentionBackend:
    """One attention implementation over the paged KV cache.

    `forward` writes the step's K/V into the cache (when there is one and the caller has not:
    `kv_stored`), then runs `prefill` or `decode` as `meta.is_prefill` says. Shapes: q
    [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim]; caches
    [num_blocks, block_size, num_kv_heads, head_dim]; the result is [num_tokens, num_heads,
    head_dim]. num_heads is a multiple of num_kv_heads (GQA).
    """

    name: str
    # whether `forward` can be captured in a CUDA graph (no sizes taken from host values)
    cuda_graph_safe: bool = True
    # whether the caches may be fp8 (FP8_KV_DTYPES; `kv_scales`: a cached value times its
    # tensor's scale is the real one)
    supports_fp8_kv: bool = True
    # whether `decode` gains from `AttentionMetadata.shared_prefix` (cascade attention);
    # every backend gives the right result with it
    shared_prefix_decode: bool = False

    def store(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        store_kvcache(k, v, k_cache, v_cache, slot_mapping, *kv_scales)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        raise NotImplementedError

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_stored: bool = False,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        """`kv_scales`: (k_scale, v_scale) of fp8 caches (ignored for others)."""
        if k_cache.numel() and not kv_stored:
            self.store(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
        if meta.is_prefill:
            return self.prefill(q, k, v, k_cache, v_cache, meta, scale, kv_scales)
        return self.decode(q, k_cache, v_cache, meta, scale, kv_scales)
