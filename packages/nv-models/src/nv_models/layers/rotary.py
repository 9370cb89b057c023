from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding over the full head dim: a float32 cos/sin table by position.
    `forward(positions)` gathers a step's rows; the attention layers apply them together with
    their q/k norms (`nv_kernels.rope_store`)."""

    def __init__(self, head_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (
            base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        )
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        self.register_buffer(
            "cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False
        )

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """The table's rows for `positions` ([T, D]: cos | sin halves), gathered once per step
        and shared by every layer."""
        return self.cos_sin_cache[positions]
