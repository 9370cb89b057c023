from __future__ import annotations

from typing import Protocol

import torch

from nv_kernels.flash_attention import FlashAttentionBackend, flash_attn_available
from nv_kernels.metadata import AttentionMetadata
from nv_kernels.torch_attention import TorchAttentionBackend

BACKEND_NAMES = ("auto", "torch", "triton", "flash-attn")


class AttentionBackend(Protocol):
    """Writes the step's K/V into the paged cache, then attends (prefill or decode by meta).
    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
    caches: [num_blocks, block_size, num_kv_heads, head_dim].
    Returns [num_tokens, num_heads, head_dim]."""

    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...


def get_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """Resolve a backend name. `auto`: triton on CUDA (our tuned, tested kernels), torch
    elsewhere. flash-attn is used only when asked for by name."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention_backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "flash-attn":
        if not flash_attn_available():
            raise ValueError("attention_backend='flash-attn' but flash_attn is not installed")
        return FlashAttentionBackend()
    from nv_kernels.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend()
