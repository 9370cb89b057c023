"""nv's kernels: attention backends over a paged KV cache, the KV store kernel and the sampler."""

from nv_kernels.backends import BACKEND_NAMES, AttentionBackend, get_attention_backend
from nv_kernels.metadata import AttentionMetadata
from nv_kernels.sampler import Sampler, SamplingTensors, sample
from nv_kernels.store_kvcache import store_kvcache, store_kvcache_ref

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "AttentionMetadata",
    "Sampler",
    "SamplingTensors",
    "get_attention_backend",
    "sample",
    "store_kvcache",
    "store_kvcache_ref",
]
