"""The small-batch GEMM kernel against F.linear, under the Triton interpreter on CPU."""

import pytest
import torch
import torch.nn.functional as F

from nv_kernels.skinny_gemm import (
    MAX_ROWS,
    SkinnyConfig,
    default_config,
    skinny_gemm,
    use_skinny_gemm,
)
from nv_kernels.triton_utils import tile_counters


@pytest.mark.parametrize("m", [1, 5, 16, 33, 70])
@pytest.mark.parametrize(
    "n, k, config",
    [
        (64, 128, SkinnyConfig(16, 32, 1)),  # even K, one slice
        (100, 96, SkinnyConfig(32, 32, 3)),  # ragged N, three K slices
        (48, 80, SkinnyConfig(16, 32, 2)),  # K not a multiple of the slices' tiles
        (48, 64, SkinnyConfig(16, 32, 2, block_m=32)),  # rows in fixed 32-row tiles
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
    assert not tile_counters(x.device).any()  # split K left its counters ready for the next call


@pytest.mark.parametrize("m", [1, 7, 65])
@pytest.mark.parametrize(
    "n, k, config",
    [(64, 128, SkinnyConfig(16, 32, 1)), (100, 96, SkinnyConfig(32, 32, 3)), (40, 64, None)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_gated_skinny_gemm_is_silu_and_mul(m, n, k, config, bias):
    # weight [2n, k] = [gate; up]: silu(x Wg^T + bg) * (x Wu^T + bu) in the GEMM's epilogue
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(2 * n, k, generator=g) / k**0.5
    b = torch.randn(2 * n, generator=g) if bias else None
    y = F.linear(x, w, b)
    ref = F.silu(y[:, :n]) * y[:, n:]
    out = skinny_gemm(x, w, b, config, gated=True)
    assert out.shape == (m, n)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not tile_counters(x.device).any()


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
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        skinny_gemm(torch.randn(MAX_ROWS + 1, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="even number of rows"):
        skinny_gemm(torch.randn(2, 8), torch.randn(5, 8), gated=True)


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize(
    "n, k", [(4096, 1024), (1024, 2048), (3072, 1024), (1024, 3072), (200, 72)]
)
def test_default_config_fills_the_sms(m, n, k, pdl):
    # Qwen3-0.6B's decode GEMMs (gate_up as its 3072 gated outputs) on a 132-SM card: at least
    # half the SMs get a program (a quarter with PDL at <= 16 rows, whose programs each load
    # more) unless K cannot be split further; K splits into whole tiles.
    c = default_config(m, n, k, 132, pdl=pdl, gated=n == 3072)
    programs = -(-n // c.block_n) * -(-m // 64) * c.split_k
    can_split = k % (2 * c.split_k * c.block_k) == 0 and c.split_k < 8
    share = 4 if pdl and m <= 16 else 2
    assert share * programs >= 132 or not can_split
    assert k % (c.block_k * c.split_k) == 0 or c.split_k == 1


def test_dispatch_only_for_small_half_precision_cuda_batches():
    w = torch.randn(8, 8)
    assert not use_skinny_gemm(torch.randn(1, 8), w)  # CPU: always F.linear


def test_variant_rows_cover_every_launch_up_to_the_dispatch_limit():
    """Warming these row counts compiles every variant that 1..64 rows launch: each row count's
    tile height (16, 32 or 64) and Triton's specialisation of M (1, a multiple of 16, other)."""
    import triton

    from nv_kernels import SKINNY_DISPATCH_ROWS, skinny_variant_rows

    def variant(m):
        return min(64, max(16, triton.next_power_of_2(m))), m == 1, m % 16 == 0

    rows = skinny_variant_rows()
    assert max(rows) <= SKINNY_DISPATCH_ROWS
    assert {variant(m) for m in rows} == {variant(m) for m in range(1, SKINNY_DISPATCH_ROWS + 1)}
    assert len(rows) == len({variant(m) for m in rows})  # one row count per variant
