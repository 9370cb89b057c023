"""The fused q/k-norm + rotary + KV-store kernel against its torch reference, interpreted on CPU."""

import pytest
import torch
from nv_testing import assert_fp8_cache_equal

from nv_kernels import allocate_kv_cache
from nv_kernels.rope_store import qk_norm_rope_store, qk_norm_rope_store_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (6, 6, 32), (3, 1, 128)])
def test_matches_reference(dtype, norm, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    t, num_blocks, block_size = 9, 6, 4
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    cos_sin = torch.randn(t, head_dim, generator=g)
    weights = [(torch.rand(head_dim, generator=g) + 0.5).to(dtype) if norm else None for _ in "qk"]
    # distinct slots in ragged blocks; -1 (padding) skips the store
    slots = torch.tensor([3, 0, -1, 7, 12, 19, 5, -1, 22])
    caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype) for _ in "kv"]
    ref_qkv, ref_caches = qkv.clone(), [c.clone() for c in caches]
    out = qk_norm_rope_store(qkv, cos_sin, *weights, 1e-6, heads, kv_heads, *caches, slots)
    ref = qk_norm_rope_store_ref(
        ref_qkv, cos_sin, *weights, 1e-6, heads, kv_heads, *ref_caches, slots
    )
    # The interpreter rounds float32 -> bfloat16 by truncation (CUDA rounds to nearest), so
    # bfloat16 results may differ by an ulp or two.
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, want in zip([*out, *caches], [*ref, *ref_caches], strict=True):
        torch.testing.assert_close(got, want, **tol)
    assert out[0].data_ptr() == qkv.data_ptr()  # q, k rotated in place in qkv
    assert torch.count_nonzero(caches[0].view(-1, kv_heads, head_dim)[1]) == 0  # untouched slot


def test_rejects_bad_inputs():
    qkv = torch.randn(2, 4 * 16)
    caches = [torch.zeros(2, 4, 1, 16) for _ in "kv"]
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="qkv"):
        qk_norm_rope_store(qkv[:, :48], torch.randn(2, 16), None, None, 1e-6, 2, 1, *caches, slots)
    with pytest.raises(ValueError, match="norm weights"):
        qk_norm_rope_store(
            qkv, torch.randn(2, 16), torch.ones(16), None, 1e-6, 2, 1, *caches, slots
        )


@pytest.mark.parametrize("kv_scales", [(1.0, 1.0), (0.5, 0.25)])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_caches_match_reference(kv_scales, fp8):
    # the engine's fp8 layout (V token-minor) against the reference's writes into plain caches
    # float32 activations, so any difference in the fp8 bytes would be the kernel's quantization
    g = torch.Generator().manual_seed(11)
    heads, kv_heads, head_dim, t = 4, 2, 32, 9
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g) * 3
    cos_sin = torch.randn(t, head_dim, generator=g)
    weights = [torch.rand(head_dim, generator=g) + 0.5 for _ in "qk"]
    slots = torch.tensor([3, 0, -1, 7, 12, 19, 5, -1, 22])
    caches = [c[0] for c in allocate_kv_cache(1, 6, 4, kv_heads, head_dim, fp8, "cpu")]
    assert caches[1].stride(1) == 1
    ref_qkv = qkv.clone()
    ref_caches = [torch.zeros(6, 4, kv_heads, head_dim, dtype=fp8) for _ in "kv"]
    qk_norm_rope_store(qkv, cos_sin, *weights, 1e-6, heads, kv_heads, *caches, slots, *kv_scales)
    qk_norm_rope_store_ref(
        ref_qkv, cos_sin, *weights, 1e-6, heads, kv_heads, *ref_caches, slots, *kv_scales
    )
    torch.testing.assert_close(qkv, ref_qkv)
    for got, want in zip(caches, ref_caches, strict=True):
        assert_fp8_cache_equal(got, want)
