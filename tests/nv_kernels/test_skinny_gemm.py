"""The small-batch GEMM kernel against F.linear, under the Triton interpreter on CPU."""

import pytest
import torch
import torch.nn.functional as F

from nv_kernels.skinny_gemm import SkinnyConfig, default_config, skinny_gemm, use_skinny_gemm


@pytest.mark.parametrize("m", [1, 5, 16, 33])
@pytest.mark.parametrize(
    "n, k, config",
    [
        (64, 128, SkinnyConfig(16, 32, 1)),  # even K, one slice
        (100, 96, SkinnyConfig(32, 32, 3)),  # ragged N, three K slices
        (48, 80, SkinnyConfig(16, 32, 2)),  # K not a multiple of the slices' tiles
        (40, 64, None),  # the default heuristic
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_gemm_matches_linear(m, n, k, config, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    out = skinny_gemm(x, w, b, config)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_skinny_gemm_strided_rows_and_half_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 160, generator=g)[:, :128]  # rows with a stride beyond K
    w = torch.randn(96, 128, generator=g)
    out = skinny_gemm(x.half(), w.half(), config=SkinnyConfig(32, 64, 2))
    ref = F.linear(x.half().float(), w.half().float())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=5e-2)


def test_skinny_gemm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="input features"):
        skinny_gemm(torch.randn(2, 8), torch.randn(4, 16))
    with pytest.raises(ValueError, match="at most 64 rows"):
        skinny_gemm(torch.randn(65, 8), torch.randn(4, 8))


def test_default_config_fills_the_sms():
    # Qwen3-0.6B's decode GEMMs on a 132-SM card: the widest tile with a program for half the
    # SMs (the narrowest tile where no width gets there), whole K tiles.
    widths = {(4096, 1024): 32, (1024, 2048): 16, (6144, 1024): 64, (1024, 3072): 16}
    for (n, k), width in widths.items():
        c = default_config(n, k, 132)
        assert c.block_n == width
        assert k % (c.block_k * c.split_k) == 0


def test_dispatch_only_for_small_half_precision_cuda_batches():
    w = torch.randn(8, 8)
    assert not use_skinny_gemm(torch.randn(1, 8), w)  # CPU: always F.linear
