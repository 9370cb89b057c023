from __future__ import annotations

from typing import Any

from torch import nn

from nv_kernels import AttentionBackend
from nv_models.parallel import TPGroup
from nv_models.qwen3 import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def attention_window(config: Any) -> int | None:
    """The sliding window some of the model's layers attend within, or None (full attention
    everywhere). nv computes full attention, which is the same for sequences no longer than the
    window: the engine caps max_model_len there."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def build_model(config: Any, tp: TPGroup, backend: AttentionBackend) -> nn.Module:
    """Instantiate the architecture named in a Hugging Face config (uninitialised weights)."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch](config, tp, backend)
    raise ValueError(
        f"unsupported architectures {archs!r} in config.json; supported: {sorted(MODEL_REGISTRY)}"
    )
