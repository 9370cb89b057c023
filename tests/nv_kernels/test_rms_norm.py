"""The Triton RMSNorm kernel against its torch reference (the model's path off CUDA), under the
Triton interpreter on CPU."""

import pytest
import torch

from nv_kernels.rms_norm import rms_norm_ref, rms_norm_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(dtype, d, with_residual):
    g = torch.Generator().manual_seed(d)
    wide = torch.randn(5, d + 8, generator=g).to(dtype)
    x = wide[:, :d]  # strided rows, as a view of a wider activation
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    eps = 1e-6
    if with_residual:
        res = torch.randn(5, d, generator=g).to(dtype)
        out, new_res = rms_norm_triton(x, w, eps, res)
        ref_res = res + x
        ref_out = rms_norm_ref(ref_res, w, eps)
        torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    else:
        out = rms_norm_triton(x, w, eps)
        ref_out = rms_norm_ref(x, w, eps)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)


def test_rms_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(torch.randn(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_triton(torch.randn(2, 8), torch.ones(8), 1e-6, torch.randn(3, 8))
    with pytest.raises(ValueError, match="x must be"):
        rms_norm_triton(torch.randn(2, 3, 8), torch.ones(8), 1e-6)


def test_overlapped_launches_are_plain_off_hopper():
    # the interpreter (and CPU tensors) never launch with PDL: same result inside the block
    from nv_kernels.pdl import overlapped_launches, use_pdl

    x, w = torch.randn(3, 32), torch.rand(32) + 0.5
    want = rms_norm_triton(x, w, 1e-6)
    with overlapped_launches():
        assert not use_pdl(x.device)
        torch.testing.assert_close(rms_norm_triton(x, w, 1e-6), want, rtol=0, atol=0)
