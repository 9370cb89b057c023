from __future__ import annotations

import importlib.util

from torch import Tensor

from nv_kernels.attention_backend import AttentionBackend
from nv_kernels.metadata import AttentionMetadata


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


class FlashAttentionBackend(AttentionBackend):
    """flash-attn 2: varlen prefill with block tables, `flash_attn_with_kvcache` for decode.
    Imported lazily, used only when asked for by name. flash-attn's paged KV wants block sizes
    that are multiples of 256."""

    name = "flash-attn"
    supports_fp8_kv = False

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

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
        if meta.block_tables is not None:  # context (prefix hits, earlier chunks) in the cache
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

    def decode(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> Tensor:
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
