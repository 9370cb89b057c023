from __future__ import annotations

import torch
from torch import nn

from nv_kernels import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    """Paged attention for one layer. The model runner assigns `k_cache`/`v_cache`
    ([num_blocks, block_size, num_kv_heads, head_dim]); the step's metadata is an argument."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.backend = backend
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        """`kv_stored`: the caller already wrote k and v into the cache."""
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        o = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, kv_stored)
        return o.flatten(-2, -1)
