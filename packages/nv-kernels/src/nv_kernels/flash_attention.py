from __future__ import annotations

import importlib.util

import torch

from nv_kernels.metadata import AttentionMetadata
from nv_kernels.store_kvcache import store_kvcache


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


class FlashAttentionBackend:
    """flash-attn 2: varlen prefill with block tables, `flash_attn_with_kvcache` for decode.
    Imported lazily; only `auto` on CUDA picks it, and only when installed."""

    name = "flash-attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if k_cache.numel():
            store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_prefill:
            if meta.block_tables is not None:
                k, v = k_cache, v_cache
            return self._varlen(
                q,
                k,
                v,
                cu_seqlens_q=meta.cu_seqlens_q,
                cu_seqlens_k=meta.cu_seqlens_k,
                max_seqlen_q=meta.max_seqlen_q,
                max_seqlen_k=meta.max_seqlen_k,
                softmax_scale=scale,
                causal=True,
                block_table=meta.block_tables,
            )
        o = self._with_kvcache(
            q.unsqueeze(1),
            k_cache,
            v_cache,
            cache_seqlens=meta.context_lens,
            block_table=meta.block_tables,
            softmax_scale=scale,
            causal=True,
        )
        return o.squeeze(1)
