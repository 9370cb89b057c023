"""RMSNorm, optionally after adding the residual, in one Triton kernel (one program per row).
The kernel can also take its input as the sum of N tensors at given device addresses: every
tensor-parallel rank's partial sums in peer-mapped memory, which fuses the all-reduce into it
(`rms_norm_of_sum`).

Rounded like Hugging Face's RMSNorm in the input dtype: the residual sum is rounded to the dtype,
normalised in float32, rounded, then multiplied by the weight and rounded again. The kernel joins
the decode graphs' programmatic-dependent-launch chain (`pdl.overlapped_launches`):
the weight is loaded before waiting on the kernel that wrote x.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nv_kernels.pdl import pdl_kwargs, pdl_wait, use_pdl
from nv_kernels.triton_utils import tl, triton, triton_usable


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32, the weight applied after casting back (Hugging
    Face's order). The torch path off CUDA (and the q/k norms' reference); the kernel's rounding."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


if triton is not None:
    # a barrier's wait reads the abort flag once per this many tries (the flag is in host memory)
    _ABORT_EVERY = tl.constexpr(16)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        parts_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        signal_ptr,
        abort_addr,
        T,
        D,
        stride_x,
        stride_r,
        eps,
        rank,
        BLOCK: tl.constexpr,
        HAS_RES: tl.constexpr,
        PARTS: tl.constexpr,
        SIGNAL: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Rows program_id, program_id + num_programs, ... of T. With SIGNAL, the parts are
        every rank's (rank `rank` of PARTS) and each program first meets its namesakes on the
        other ranks (`_meet_peers`)."""
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        if SIGNAL:
            _meet_peers(signal_ptr, rank, abort_addr, PARTS)
        dtype = out_ptr.dtype.element_ty
        for t in range(tl.program_id(0), T, tl.num_programs(0)):
            row = t + tl.zeros([], tl.int64)  # 64-bit offsets
            if PARTS == 0:
                x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            else:  # x = the sum of PARTS [T, D] tensors (other ranks': read past L1, ".cg")
                acc = tl.zeros([BLOCK], tl.float32)
                for i in tl.static_range(PARTS):
                    part = tl.load(parts_ptr + i).to(tl.pointer_type(dtype))
                    part = tl.multiple_of(part, 16)  # whole rows of 16-byte multiples
                    acc += tl.load(
                        part + row * D + cols, mask=mask, other=0.0, cache_modifier=".cg"
                    ).to(tl.float32)
                x = acc.to(dtype)  # rounded as an all-reduce's result is
            if HAS_RES:
                r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
                tl.store(res_out_ptr + row * D + cols, x, mask=mask)
            x = x.to(tl.float32)
            y = (x * tl.rsqrt(tl.sum(x * x, 0) / D + eps)).to(dtype).to(tl.float32)
            tl.store(out_ptr + row * D + cols, (w * y).to(dtype), mask=mask)

    @triton.jit
    def _meet_peers(signal_ptr, rank, abort_addr, WORLD: tl.constexpr):
        """A barrier between this program and the programs of the same id on the other ranks,
        through the signal pads at the addresses `signal_ptr` ([WORLD] int64): torch's
        symmetric-memory protocol, on channel program_id + 1 (slot channel * WORLD + r of a
        rank's pad is written by rank r). Signal every peer (0 -> 1 in its pad, once it took
        the last signal), then take every peer's signal (1 -> 0 in this rank's pad). The
        release and acquire are system-wide: the peers' writes before their signal (their
        part) are visible after it. A wait that spins also reads the int32 at `abort_addr` (host
        memory the device maps, a PCIe round trip) every _ABORT_EVERY tries, and gives up once
        it is set."""
        base = (tl.program_id(0) + 1) * WORLD
        mine = tl.load(signal_ptr + rank).to(tl.pointer_type(tl.int32))
        abort = abort_addr.to(tl.pointer_type(tl.int32))
        for r in tl.static_range(WORLD):
            if r != rank:
                peer = tl.load(signal_ptr + r).to(tl.pointer_type(tl.int32))
                old = tl.atomic_cas(peer + base + rank, 0, 1, sem="release", scope="sys")
                spins = 0
                while old != 0:
                    old = tl.atomic_cas(peer + base + rank, 0, 1, sem="release", scope="sys")
                    spins += 1
                    if spins % _ABORT_EVERY == 0:  # noqa: SIM102 (the load only then)
                        if tl.load(abort, volatile=True) != 0:
                            old = 0
        for r in tl.static_range(WORLD):
            if r != rank:
                old = tl.atomic_cas(mine + base + r, 1, 0, sem="acquire", scope="sys")
                spins = 0
                while old != 1:
                    old = tl.atomic_cas(mine + base + r, 1, 0, sem="acquire", scope="sys")
                    spins += 1
                    if spins % _ABORT_EVERY == 0:  # noqa: SIM102 (the load only then)
                        if tl.load(abort, volatile=True) != 0:
                            old = 1


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x `[T, D]` (rows may be strided); with `residual`, of `residual + x`, and then
    also returns that sum (the next layer's residual)."""
    if not triton_usable(x.device):
        raise RuntimeError("rms_norm_triton needs CUDA or TRITON_INTERPRET=1")
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, D] with a contiguous last dim, got {tuple(x.shape)}")
    t, d = x.shape
    if weight.shape != (d,):
        raise ValueError(f"weight must be [{d}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual must be {tuple(x.shape)} with a contiguous last dim")
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if t:
        _rms_norm_kernel[(t,)](
            x,
            x,  # no parts
            residual if residual is not None else x,
            weight,
            out,
            res_out,
            x,  # no signal pads
            0,
            t,
            d,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            eps,
            0,
            BLOCK=triton.next_power_of_2(d),
            HAS_RES=residual is not None,
            PARTS=0,
            SIGNAL=False,
            num_warps=4 if d <= 4096 else 8,
            **pdl_kwargs(use_pdl(x.device)),
        )
    return out if residual is None else (out, res_out)


def rms_norm_of_sum(
    part_addrs: torch.Tensor,
    rows: int,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    peers: PeerSignals | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_triton` of x = the sum of N contiguous `[rows, D]` tensors of weight's dtype
    found at the device addresses `part_addrs` (int64 `[N]`, on the device): each
    tensor-parallel rank's partial sums in peer-mapped memory, so that the all-reduce, the
    residual add and the norm are one kernel. The parts are summed in float32 in the order
    given (every rank gets the same bits) and rounded to the dtype, as the all-reduce's result
    would be. The parts must not be overwritten during the kernel; they must be written before
    it, which `peers` makes sure of: every rank runs this call, and each of its programs waits
    at the start for the same program on every other rank (a barrier inside the kernel, which
    spares one launch per call). Without `peers` the caller synchronises the ranks."""
    if not triton_usable(weight.device):
        raise RuntimeError("rms_norm_of_sum needs CUDA or TRITON_INTERPRET=1")
    if part_addrs.dtype != torch.int64 or part_addrs.dim() != 1:
        raise ValueError(
            f"part_addrs must be int64 [N], got {part_addrs.dtype} {tuple(part_addrs.shape)}"
        )
    d = weight.shape[0]
    if d % 8:
        raise ValueError(f"the hidden size must be a multiple of 8 (16-byte rows), got {d}")
    if residual is not None and (residual.shape != (rows, d) or residual.stride(-1) != 1):
        raise ValueError(f"residual must be ({rows}, {d}) with a contiguous last dim")
    if peers is not None and peers.addrs.shape != part_addrs.shape:
        raise ValueError("peers must hold one signal pad per part")
    out = torch.empty(rows, d, dtype=weight.dtype, device=weight.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if rows:
        grid = rows if peers is None else min(rows, peers.max_programs)
        _rms_norm_kernel[(grid,)](
            out,  # x: unused
            part_addrs,
            residual if residual is not None else out,
            weight,
            out,
            res_out,
            part_addrs if peers is None else peers.addrs,
            0 if peers is None else peers.abort_addr,
            rows,
            d,
            0,
            residual.stride(0) if residual is not None else 0,
            eps,
            0 if peers is None else peers.rank,
            BLOCK=triton.next_power_of_2(d),
            HAS_RES=residual is not None,
            PARTS=part_addrs.shape[0],
            SIGNAL=peers is not None,
            num_warps=4 if d <= 4096 else 8,
            **pdl_kwargs(use_pdl(weight.device)),
        )
    return out if residual is None else (out, res_out)


class PeerSignals(NamedTuple):
    """Where `rms_norm_of_sum` meets the other ranks: `addrs`, the device addresses (int64
    `[ranks]`) of every rank's signal pad (int32 slots, torch's symmetric-memory layout: slot
    `channel * ranks + r` is written by rank r); this rank's index; the most programs a
    call may launch, each of which uses channel program_id + 1 (channel 0 stays torch's); and
    `abort_addr`, the address of an int32 the device can read (pinned host memory) whose
    setting makes every wait in the barrier give up: after a peer died, the host releases the
    barriers with one store and no CUDA call (a call could wait behind them)."""

    addrs: torch.Tensor
    rank: int
    max_programs: int
    abort_addr: int
