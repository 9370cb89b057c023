from __future__ import annotations

import torch
from torch import nn

from nv_kernels import (
    AttentionBackend,
    AttentionMetadata,
    qk_norm_rope,
    qk_norm_rope_store,
    use_qk_norm_rope_store,
)
from nv_models.layers.compile import compile_on_cuda

# torch's q/k norm + rotary where the fused kernel does not run: one Inductor kernel on CUDA,
# eager elsewhere (bit-comparable with transformers on CPU)
_qk_norm_rope = compile_on_cuda(qk_norm_rope)


class Attention(nn.Module):
    """Paged attention for one layer. The model runner assigns `k_cache`/`v_cache`
    ([num_blocks, block_size, num_kv_heads, head_dim], in the model's dtype or an fp8 dtype)
    and, for fp8 caches, `kv_scales` (k_scale, v_scale: a cached value times its scale is the
    real one); the step's metadata is an argument."""

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
        self.kv_scales = (1.0, 1.0)

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
        o = self.backend.forward(
            q, k, v, self.k_cache, self.v_cache, meta, self.scale, kv_stored, self.kv_scales
        )
        return o.flatten(-2, -1)

    def forward_qkv(
        self,
        qkv: torch.Tensor,
        cos_sin: torch.Tensor,
        q_norm_weight: torch.Tensor | None,
        k_norm_weight: torch.Tensor | None,
        eps: float,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Attention from the fused qkv projection `[num_tokens, (heads + 2 kv_heads) *
        head_dim]`: optional q/k RMSNorms (their weights, or None), rotary from `cos_sin` (the
        step's rows of the rotary table), the KV store, then `forward`. Where the fused kernel
        can run (CUDA, a cache, a supported head_dim) norms, rotary and the store are one
        kernel; elsewhere torch does them and the backend stores K/V."""
        if use_qk_norm_rope_store(qkv, self.k_cache, self.head_dim):
            q, k, v = qk_norm_rope_store(
                qkv, cos_sin, q_norm_weight, k_norm_weight, eps, self.num_heads,
                self.num_kv_heads, self.k_cache, self.v_cache, meta.slot_mapping, *self.kv_scales,
            )  # fmt: skip
            return self(q, k, v, meta, kv_stored=True)
        q, k, v = _qk_norm_rope(
            qkv, cos_sin, q_norm_weight, k_norm_weight, eps, self.num_heads, self.num_kv_heads,
            self.head_dim,
        )  # fmt: skip
        return self(q, k, v, meta)
