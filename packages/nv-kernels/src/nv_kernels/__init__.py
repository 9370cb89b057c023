"""nv's kernels: attention backends over a paged KV cache, its layout, the KV store and fused
rope+store kernels, RMSNorm, the small-batch GEMM, programmatic dependent launch and the
sampler. Other packages import from here, never from the modules."""

from nv_kernels.backends import BACKEND_NAMES, AttentionBackend, get_attention_backend
from nv_kernels.kv_cache import allocate_kv_cache
from nv_kernels.metadata import AttentionMetadata, SharedPrefix
from nv_kernels.pdl import overlapped_launches
from nv_kernels.rms_norm import PeerSignals, rms_norm_of_sum, rms_norm_ref, rms_norm_triton
from nv_kernels.rope_store import qk_norm_rope, qk_norm_rope_store, use_qk_norm_rope_store
from nv_kernels.sampler import Sampler, SamplingTensors, apply_penalties, sample, token_logprobs
from nv_kernels.skinny_gemm import DISPATCH_ROWS as SKINNY_DISPATCH_ROWS
from nv_kernels.skinny_gemm import skinny_gemm, skinny_variant_rows, use_skinny_gemm
from nv_kernels.store_kvcache import (
    FP8_KV_DTYPES,
    dequantize_kv,
    quantize_kv,
    store_kvcache,
    store_kvcache_ref,
)
from nv_kernels.triton_attention import eager_decode_widths
from nv_kernels.triton_utils import triton

__all__ = [
    "BACKEND_NAMES",
    "FP8_KV_DTYPES",
    "SKINNY_DISPATCH_ROWS",
    "AttentionBackend",
    "AttentionMetadata",
    "PeerSignals",
    "Sampler",
    "SamplingTensors",
    "SharedPrefix",
    "allocate_kv_cache",
    "apply_penalties",
    "dequantize_kv",
    "eager_decode_widths",
    "get_attention_backend",
    "overlapped_launches",
    "qk_norm_rope",
    "qk_norm_rope_store",
    "quantize_kv",
    "rms_norm_of_sum",
    "rms_norm_ref",
    "rms_norm_triton",
    "sample",
    "skinny_gemm",
    "skinny_variant_rows",
    "store_kvcache",
    "store_kvcache_ref",
    "token_logprobs",
    "triton",
    "use_qk_norm_rope_store",
    "use_skinny_gemm",
]
