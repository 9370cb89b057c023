"""Qwen3 (and the Qwen2 / Llama family, which differ only in q/k norms and biases)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nv_kernels import (
    AttentionBackend,
    AttentionMetadata,
)
from nv_models.layers.attention import Attention
from nv_models.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nv_models.layers.layernorm import RMSNorm
from nv_models.layers.linear import GateUpParallelLinear, QKVParallelLinear, RowParallelLinear
from nv_models.layers.rotary import RotaryEmbedding, rope_inv_freq
from nv_models.parallel import TPGroup


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """What differs between the Qwen3 / Qwen2 / Llama attention blocks."""

    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    qkv_bias: bool
    o_bias: bool


class Qwen3Attention(nn.Module):
    def __init__(
        self, config: Any, tp: TPGroup, backend: AttentionBackend, spec: AttentionSpec
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.qkv_proj = QKVParallelLinear(
            hidden, self.head_dim, total_heads, total_kv_heads, bias=spec.qkv_bias, tp=tp
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(  # reduced by post_attention_layernorm
            total_heads * self.head_dim, hidden, bias=spec.o_bias, tp=tp, reduce_results=False
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, backend
        )
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, cos_sin: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """`cos_sin`: the rotary table's rows for this step's positions (one gather per step,
        made by the model)."""
        qkv = self.qkv_proj(x)
        q_w = None if self.q_norm is None else self.q_norm.weight
        k_w = None if self.k_norm is None else self.k_norm.weight
        eps = self.q_norm.eps if self.q_norm is not None else 0.0
        return self.o_proj(self.attn.forward_qkv(qkv, cos_sin, q_w, k_w, eps, meta))


class Qwen3MLP(nn.Module):
    def __init__(self, config: Any, tp: TPGroup) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = GateUpParallelLinear(
            config.hidden_size, config.intermediate_size, bias=bias, tp=tp
        )
        self.down_proj = RowParallelLinear(  # reduced by the next norm
            config.intermediate_size, config.hidden_size, bias=bias, tp=tp, reduce_results=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))  # gate_up_proj applies silu(gate) * up


class Qwen3DecoderLayer(nn.Module):
    def __init__(
        self, config: Any, tp: TPGroup, backend: AttentionBackend, spec: AttentionSpec
    ) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, tp, backend, spec)
        self.mlp = Qwen3MLP(config, tp)
        # the residual stream's norms reduce their input: the row-parallel layers before them
        # leave it unreduced, so the all-reduce fuses with the add and the norm (layer 0's
        # input_layernorm, given no residual, gets the embedding's output, already reduced)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp)

    def forward(
        self,
        cos_sin: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(cos_sin, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen3Model(nn.Module):
    def __init__(
        self, config: Any, tp: TPGroup, backend: AttentionBackend, spec: AttentionSpec
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        inv_freq, scale = rope_inv_freq(config, head_dim(config))
        self.rotary_emb = RotaryEmbedding(
            head_dim(config), config.max_position_embeddings, inv_freq, scale
        )
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, tp, backend, spec) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, tp)  # (see the layer's)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(cos_sin, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class Qwen3ForCausalLM(nn.Module):
    """Built from a Hugging Face config. `forward` returns hidden states for every token;
    `compute_logits` projects only the rows asked for."""

    # checkpoint module name -> (our packed module, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, tp: TPGroup, backend: AttentionBackend) -> None:
        super().__init__()
        self.model = Qwen3Model(config, tp, backend, self.attention_spec(config))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def attention_spec(config: Any) -> AttentionSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionSpec(qk_norm=True, qkv_bias=bias, o_bias=bias)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(
        self,
        hidden: torch.Tensor,
        logits_indices: torch.Tensor | None = None,
        gather: bool = True,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the rows asked for; with tensor parallelism and `gather=False`, this
        rank's vocabulary shard of them (`lm_head.vocab_start` is its first token id),
        written into `out` when given."""
        return self.lm_head(hidden, logits_indices, gather, out)


class Qwen2ForCausalLM(Qwen3ForCausalLM):
    """Qwen2 / Qwen2.5: biased q/k/v projections, no q/k norm."""

    @staticmethod
    def attention_spec(config: Any) -> AttentionSpec:
        return AttentionSpec(qk_norm=False, qkv_bias=True, o_bias=False)


class LlamaForCausalLM(Qwen3ForCausalLM):
    """Llama (and Mistral): no q/k norm, biases where `attention_bias` says."""

    @staticmethod
    def attention_spec(config: Any) -> AttentionSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionSpec(qk_norm=False, qkv_bias=bias, o_bias=bias)
