from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nv_kernels.attention_backend import AttentionBackend
from nv_kernels.metadata import AttentionMetadata
from nv_kernels.store_kvcache import dequantize_kv, store_kvcache_ref


class TorchAttentionBackend(AttentionBackend):
    """The reference backend: plain torch, any device. Every other backend is tested against it."""

    name = "torch"
    cuda_graph_safe = False  # sizes its tensors from host values

    def store(
        self,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        slot_mapping: Tensor,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping, *kv_scales)

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
        return prefill_ref(q, k, v, k_cache, v_cache, meta, scale, kv_scales)

    def decode(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> Tensor:
        return decode_ref(q, k_cache, v_cache, meta, scale, kv_scales)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]  # [length, Hkv, D]


def prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Causal varlen attention; a sequence's last len_q tokens attend to its len_k-token context
    (read from the caches, dequantized, when there are block tables)."""
    out = torch.empty_like(q)
    cu_q = meta.cu_seqlens_q.tolist()
    cu_k = meta.cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        q0, q1 = cu_q[i], cu_q[i + 1]
        len_q, len_k = q1 - q0, cu_k[i + 1] - cu_k[i]
        if meta.block_tables is not None:
            ks = _gather_context(k_cache, meta.block_tables[i], len_k)
            vs = _gather_context(v_cache, meta.block_tables[i], len_k)
            ks = dequantize_kv(ks, q.dtype, kv_scales[0])
            vs = dequantize_kv(vs, q.dtype, kv_scales[1])
        else:
            ks, vs = k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        pos_q = torch.arange(len_k - len_q, len_k, device=q.device)
        mask = torch.arange(len_k, device=q.device)[None, :] <= pos_q[:, None]  # [len_q, len_k]
        o = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1),
            ks.transpose(0, 1).to(q.dtype),
            vs.transpose(0, 1).to(q.dtype),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )  # [H, len_q, D]
        out[q0:q1] = o.transpose(0, 1)
    return out


def decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """One query per sequence against its first context_lens[i] cached tokens."""
    block_tables = meta.block_tables.long()
    ks = k_cache[block_tables].flatten(1, 2)  # [B, max_blocks * block_size, Hkv, D]
    vs = v_cache[block_tables].flatten(1, 2)
    ks = dequantize_kv(ks, q.dtype, kv_scales[0])
    vs = dequantize_kv(vs, q.dtype, kv_scales[1])
    length = ks.shape[1]
    mask = torch.arange(length, device=q.device)[None, :] < meta.context_lens[:, None].long()
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],
        ks.transpose(1, 2).to(q.dtype),
        vs.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )  # [B, H, 1, D]
    return o[:, :, 0, :]
