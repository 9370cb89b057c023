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
}


def build_model(config: Any, tp: TPGroup, backend: AttentionBackend) -> nn.Module:
    """Instantiate the architecture named in a Hugging Face config (uninitialised weights)."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch](config, tp, backend)
    raise ValueError(
        f"unsupported architectures {archs!r} in config.json; supported: {sorted(MODEL_REGISTRY)}"
    )
