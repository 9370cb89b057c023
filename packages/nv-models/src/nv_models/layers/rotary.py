"""Rotary position embedding: the cos/sin table, with Hugging Face's rope scaling types."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding over the full head dim: a float32 cos/sin table by position.
    `forward(positions)` gathers a step's rows; the attention layers apply them together with
    their q/k norms (`nv_kernels.rope_store`). `scale` multiplies cos and sin (YaRN's attention
    factor)."""

    def __init__(
        self, head_dim: int, max_position: int, inv_freq: torch.Tensor, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        table = torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1)
        self.register_buffer("cos_sin_cache", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """The table's rows for `positions` ([T, D]: cos | sin halves), gathered once per step
        and shared by every layer."""
        return self.cos_sin_cache[positions]


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings of a Hugging Face config, old layout (`rope_theta` + `rope_scaling`) or
    new (`rope_parameters`, transformers 5): a dict with at least rope_type and rope_theta."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params) if isinstance(params, dict) else {}
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    params["rope_theta"] = float(theta if theta is not None else 10000.0)
    return params


def rope_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ([head_dim / 2], float32) and the cos/sin scale for the config's rope
    type, computed as transformers does: default, linear, llama3 (Llama 3.1+) or yarn."""
    p = rope_parameters(config)
    rope_type, base = p["rope_type"], p["rope_theta"]
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    inv_freq = 1.0 / pos_freqs
    if rope_type == "linear":
        return inv_freq / p["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, p), 1.0
    if rope_type == "yarn":
        return _yarn(config, base, pos_freqs, head_dim, p)
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """Long wavelengths slowed by `factor`, short ones kept, the band between blended."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn(
    config: Any, base: float, pos_freqs: torch.Tensor, dim: int, p: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated (slowed) low frequencies, extrapolated high ones, a linear ramp
    between, and cos/sin scaled by the attention factor."""
    max_pos = config.max_position_embeddings
    original = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    interpolated, extrapolated = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    inv_freq = interpolated * (1 - extrapolation) + extrapolated * extrapolation
    return inv_freq, float(attention_factor)
