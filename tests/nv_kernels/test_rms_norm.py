"""The Triton RMSNorm kernel against its torch reference (the model's path off CUDA), under the
Triton interpreter on CPU."""

import threading

import pytest
import torch

from nv_kernels.rms_norm import PeerSignals, rms_norm_of_sum, rms_norm_ref, rms_norm_triton


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


@pytest.mark.parametrize("num_parts", [1, 2, 3])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_of_sum_is_the_all_reduce_then_the_norm(num_parts, with_residual):
    # the parts stand for every rank's partial sums (peer memory on a GPU); the fused kernel
    # equals the unfused path bit for bit: sum rounded to the dtype (the all-reduce), then
    # rms_norm_triton with the residual. float16: the interpreter casts float32 to bfloat16 by
    # truncation, where the GPU (and torch) round to nearest
    g = torch.Generator().manual_seed(num_parts)
    d, rows = 96, 5
    parts = [torch.randn(rows, d, generator=g).to(torch.float16) for _ in range(num_parts)]
    addrs = torch.tensor([p.data_ptr() for p in parts], dtype=torch.int64)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.float16)
    res = torch.randn(rows, d, generator=g).to(torch.float16) if with_residual else None
    reduced = sum(p.float() for p in parts).to(torch.float16)
    want = rms_norm_triton(reduced, w, 1e-6, res)
    got = rms_norm_of_sum(addrs, rows, w, 1e-6, res)
    for a, b in zip(
        got if with_residual else [got], want if with_residual else [want], strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if with_residual and num_parts > 1:  # the summed input was used, not one part alone
        assert not torch.equal(got[1], parts[0] + res)


@pytest.mark.parametrize("rank", [0, 1])
def test_rms_norm_of_sum_meets_the_peers_in_its_programs(rank):
    # two ranks in one process: the other rank has signalled every channel this call uses
    # (1 in its slots of this rank's pad); each program takes its signal and signals back.
    # Few programs (max_programs=2) for 5 rows: each program loops over rows
    g = torch.Generator().manual_seed(rank)
    d, rows, world, programs = 64, 5, 2, 2
    parts = [torch.randn(rows, d, generator=g).to(torch.float16) for _ in range(world)]
    addrs = torch.tensor([p.data_ptr() for p in parts], dtype=torch.int64)
    pads = [torch.zeros(8 * world, dtype=torch.int32) for _ in range(world)]
    peer = 1 - rank
    channels = range(1, programs + 1)  # channel 0 is left to torch's own barriers
    for c in channels:
        pads[rank][c * world + peer] = 1
    never = torch.zeros(1, dtype=torch.int32)  # the abort flag, left unset
    signals = PeerSignals(
        torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64),
        rank,
        programs,
        never.data_ptr(),
    )
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.float16)
    res = torch.randn(rows, d, generator=g).to(torch.float16)
    want = rms_norm_triton(sum(p.float() for p in parts).to(torch.float16), w, 1e-6, res)
    got = rms_norm_of_sum(addrs, rows, w, 1e-6, res, peers=signals)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not pads[rank].any()  # every signal taken
    signalled = [c * world + rank for c in channels]
    assert pads[peer][signalled].tolist() == [1] * programs
    assert pads[peer].sum().item() == programs  # and nothing else written


@pytest.mark.parametrize("waits_for", ["signal", "taken"])
def test_rms_norm_of_sum_gives_up_its_barrier_once_aborted(waits_for):
    # rank 0 of two whose peer died: it never signals ("signal": rank 0 waits for it), or it
    # never took rank 0's last signal ("taken": rank 0 waits to signal again). With the abort
    # flag set, the call returns (it would spin forever without it) and sums what is there
    d, rows, world, programs = 16, 3, 2, 2
    parts = [torch.full((rows, d), float(i + 1), dtype=torch.float16) for i in range(world)]
    addrs = torch.tensor([p.data_ptr() for p in parts], dtype=torch.int64)
    pads = [torch.zeros(8 * world, dtype=torch.int32) for _ in range(world)]
    if waits_for == "taken":
        for c in range(1, programs + 1):
            pads[1][c * world + 0] = 1  # rank 0's signals, never taken by the dead rank 1
    abort = torch.ones(1, dtype=torch.int32)
    signals = PeerSignals(
        torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64), 0, programs, abort.data_ptr()
    )
    w = torch.ones(d, dtype=torch.float16)
    got = []
    call = threading.Thread(
        target=lambda: got.append(rms_norm_of_sum(addrs, rows, w, 1e-6, peers=signals)),
        daemon=True,  # without the flag it would spin forever: fail, don't hang the suite
    )
    call.start()
    call.join(60)
    assert got, "the barrier did not give up"
    want = rms_norm_triton(parts[0] + parts[1], w, 1e-6)
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)


def test_rms_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(torch.randn(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_triton(torch.randn(2, 8), torch.ones(8), 1e-6, torch.randn(3, 8))
    with pytest.raises(ValueError, match="x must be"):
        rms_norm_triton(torch.randn(2, 3, 8), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="part_addrs"):
        rms_norm_of_sum(torch.zeros(2, dtype=torch.int32), 2, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_of_sum(torch.zeros(2, dtype=torch.int64), 2, torch.ones(8), 1e-6, torch.ones(3, 8))
    with pytest.raises(ValueError, match="signal pad per part"):
        three = PeerSignals(torch.zeros(3, dtype=torch.int64), 0, 4, 0)
        rms_norm_of_sum(torch.zeros(2, dtype=torch.int64), 2, torch.ones(8), 1e-6, peers=three)


def test_overlapped_launches_are_plain_off_hopper():
    # the interpreter (and CPU tensors) never launch with PDL: same result inside the block
    from nv_kernels.pdl import overlapped_launches, use_pdl

    x, w = torch.randn(3, 32), torch.rand(32) + 0.5
    want = rms_norm_triton(x, w, 1e-6)
    with overlapped_launches():
        assert not use_pdl(x.device)
        torch.testing.assert_close(rms_norm_triton(x, w, 1e-6), want, rtol=0, atol=0)
