from __future__ import annotations

import torch

from nv_kernels.attention_backend import AttentionBackend
from nv_kernels.flash_attention import FlashAttentionBackend, flash_attn_available
from nv_kernels.torch_attention import TorchAttentionBackend

BACKEND_NAMES = ("auto", "torch", "triton", "flash-attn")


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
