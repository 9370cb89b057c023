"""nv's model code: tensor-parallel layers, Qwen3 and its relatives, the safetensors loader."""

from nv_models.layers.attention import Attention
from nv_models.loader import WeightLoadError, init_random_weights, load_weights
from nv_models.parallel import PeerAllReduce, TPGroup
from nv_models.qwen3 import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from nv_models.registry import MODEL_REGISTRY, attention_window, build_model

__all__ = [
    "MODEL_REGISTRY",
    "Attention",
    "LlamaForCausalLM",
    "PeerAllReduce",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "TPGroup",
    "WeightLoadError",
    "attention_window",
    "build_model",
    "init_random_weights",
    "load_weights",
]
