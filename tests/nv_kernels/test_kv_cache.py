"""The paged cache's memory layout (nv_kernels.kv_cache): what every kernel reads through
strides."""

import pytest
import torch

from nv_kernels import allocate_kv_cache
from nv_kernels.kv_cache import v_token_minor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_caches_are_indexed_alike_and_fp8_v_is_stored_token_minor(dtype):
    layers, blocks, bs, heads, dim = 3, 5, 16, 2, 32
    k, v = allocate_kv_cache(layers, blocks, bs, heads, dim, dtype, "cpu")
    assert k.shape == v.shape == (layers, blocks, bs, heads, dim)
    assert k.dtype == v.dtype == dtype
    assert k.is_contiguous()  # K: head_dim-minor, each token's heads in one row
    assert not k.float().any() and not v.float().any()  # zeroed: no NaN for the kernels
    fp8 = dtype != torch.bfloat16
    assert v_token_minor(v[1]) == fp8 and not v_token_minor(k[1])
    # layer 1, block 2, token 7, head 1, dim 9 lands in memory where the layout says
    v[1, 2, 7, 1, 9] = 1.0
    raw = torch.empty(0, dtype=torch.uint8).set_(v.untyped_storage())  # memory, in order
    (where,) = set((raw.nonzero()[:, 0] // v.element_size()).tolist())
    if fp8:  # [layer, block, head, dim, token]
        assert where == (((1 * blocks + 2) * heads + 1) * dim + 9) * bs + 7
    else:  # [layer, block, token, head, dim]
        assert where == (((1 * blocks + 2) * bs + 7) * heads + 1) * dim + 9
