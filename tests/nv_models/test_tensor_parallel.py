"""TP=2 over gloo on CPU, two processes: logits equal TP=1."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nv_testing import load_ours, save_tiny_qwen3

from nv_kernels import AttentionMetadata
from nv_models import PeerAllReduce, TPGroup


def _meta(ids, cu):
    return AttentionMetadata(
        True,
        torch.full((len(ids),), -1),
        None,
        None,
        cu,
        cu,
        int((cu[1:] - cu[:-1]).max()),
        int((cu[1:] - cu[:-1]).max()),
    )


def _worker(rank, world, port, path, ids, pos, cu, out_file):
    # Both ranks are clients of a store the test process owns (as the engine's TP workers are), so
    # neither rank's exit takes the rendezvous away from the other, and no port is guessed.
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        model = load_ours(path, tp=TPGroup(rank, world, dist.group.WORLD))
        with torch.no_grad():
            logits = model.compute_logits(model(ids, pos, _meta(ids, cu)))
        if rank == 0:
            torch.save(logits, out_file)
        dist.barrier()  # leave together: a rank tearing down early can abort its peer
    finally:
        dist.destroy_process_group()
    # After a clean destroy, torch's gloo (2.13, CPU) still aborts in a few % of runs during
    # the interpreter's teardown ("terminate called without an active exception"): the logits
    # are saved, so leave without that teardown.
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_tp2_matches_tp1(tmp_path, tied):
    save_tiny_qwen3(tmp_path, seed=3, tie_word_embeddings=tied)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (14,), generator=g)
    pos = torch.tensor(list(range(9)) + list(range(5)))
    cu = torch.tensor([0, 9, 14], dtype=torch.int32)
    model = load_ours(tmp_path)
    with torch.no_grad():
        ref = model.compute_logits(model(ids, pos, _meta(ids, cu)))
    out_file = tmp_path / "tp2.pt"
    store = dist.TCPStore(
        "127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False
    )
    mp.start_processes(
        _worker,
        args=(2, store.port, tmp_path, ids, pos, cu, out_file),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    got = torch.load(out_file)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_all_reduce_routes_what_the_peer_path_handles(monkeypatch):
    # TPGroup gives PeerAllReduce the messages it says it handles, everything else to NCCL/gloo
    collective: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "all_reduce", lambda x, **kw: collective.append(x))

    class Peer:
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def handles(self, x: torch.Tensor, fused: bool = True) -> bool:
            # the fused norm would take 8 elements; a plain all-reduce only 4
            return x.dtype == torch.bfloat16 and x.numel() <= (8 if fused else 4)

        def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(x)
            return x * 2

        def synced(self) -> None:
            self.seen.append("synced")

    peer = Peer()
    tp = TPGroup(0, 2, None, peer)
    small = torch.ones(4, dtype=torch.bfloat16)
    assert torch.equal(tp.all_reduce(small), small * 2) and peer.seen == [small]
    large, fp32 = torch.ones(8, dtype=torch.bfloat16), torch.ones(4)
    assert tp.all_reduce(large) is large and tp.all_reduce(fp32) is fp32
    # a collective through NCCL/gloo is a full barrier too: the peer path hears of it
    assert peer.seen == [small, "synced", "synced"] and collective == [large, fp32]
    assert TPGroup(0, 1, None, peer).all_reduce(small) is small  # one rank: nothing to do
    assert len(peer.seen) == 3 and len(collective) == 2
    # the peer path only sums: another reduction goes to NCCL/gloo whatever its size
    assert tp.all_reduce(small, op=dist.ReduceOp.MIN) is small and collective[-1] is small


def test_norms_reduce_what_row_parallel_layers_leave_unreduced(monkeypatch):
    # RowParallelLinear(reduce_results=False) gives this rank's partial sum (its bias on rank 0
    # alone); RMSNorm(tp) reduces it before the add and the norm: fused through the peer path
    # where it handles x, else an all-reduce first. Without a residual (layer 0, the embedding's
    # reduced output) nothing is reduced.
    from nv_models.layers.layernorm import RMSNorm
    from nv_models.layers.linear import RowParallelLinear

    monkeypatch.setattr(dist, "all_reduce", lambda x, **kw: x.mul_(2))  # 2 equal ranks
    calls = []

    class Peer:
        def handles(self, x: torch.Tensor, fused: bool = True) -> bool:
            return fused and x.shape[0] <= 2

        def all_reduce_rms_norm(self, x, residual, weight, eps):
            calls.append(x.shape[0])
            return RMSNorm(x.shape[1], eps)(2 * x, residual)

        def synced(self) -> None:
            pass

    g = torch.Generator().manual_seed(0)
    for rank in (0, 1):
        layer = RowParallelLinear(8, 6, bias=True, tp=TPGroup(rank, 2), reduce_results=False)
        layer.weight.data = torch.randn(6, 4, generator=g)
        layer.bias.data = torch.ones(6)
        x = torch.randn(3, 4, generator=g)
        want = x @ layer.weight.T + (layer.bias if rank == 0 else 0)
        torch.testing.assert_close(layer(x), want)
    norm = RMSNorm(6, 1e-6, TPGroup(0, 2, None, Peer()))
    for rows in (2, 5):  # the peer path takes 2 rows, NCCL/gloo 5
        x, res = torch.randn(rows, 6, generator=g), torch.randn(rows, 6, generator=g)
        out, new_res = norm(x.clone(), res)
        torch.testing.assert_close(new_res, res + 2 * x)
        torch.testing.assert_close(out, RMSNorm(6, 1e-6)(res + 2 * x))
    assert calls == [2]
    x = torch.randn(2, 6, generator=g)
    torch.testing.assert_close(norm(x), RMSNorm(6, 1e-6)(x))  # no residual: not reduced
    assert calls == [2]


def test_collectives_check_the_group_is_alive_first():
    """A group whose alive_check raises (a peer is known dead) issues no collective: it raises
    before the call, which after an abort of the group would wait forever."""

    class PeerDied(Exception):
        pass

    def dead() -> None:
        raise PeerDied("rank 1 exited")

    tp = TPGroup(rank=0, size=2, group=None, alive_check=dead)  # no process group: no call
    x = torch.ones(2, 4)
    with pytest.raises(PeerDied, match="rank 1"):
        tp.all_reduce(x)
    with pytest.raises(PeerDied, match="rank 1"):
        tp.gather_last_dim(x)
    with pytest.raises(PeerDied, match="rank 1"):
        tp.gather_ranks(x)

    class TakesAll:  # a peer path that would take the fused norm's message
        def handles(self, x: torch.Tensor, fused: bool = True) -> bool:
            return True

    fused = TPGroup(0, 2, None, TakesAll(), alive_check=dead)
    with pytest.raises(PeerDied, match="rank 1"):
        fused.all_reduce_rms_norm(x, x, torch.ones(4), 1e-6)
    assert torch.equal(TPGroup().gather_ranks(x), x[None])  # one rank: its own, stacked
    assert torch.equal(TPGroup(alive_check=dead).all_reduce(x), x)  # one rank: nothing to check


def test_peer_all_reduce_says_why_it_is_unavailable(monkeypatch):
    """A process joins at most one PeerAllReduce (torch's rendezvous keys count per process, so
    a second would wait forever for newly spawned peers), and only over GPUs that can map each
    other's memory; otherwise `unavailable` names the reason, which keeps every rank on NCCL."""
    import nv_models.parallel as parallel

    access = {(0, 1): True, (1, 0): True, (0, 2): False}
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: access[(a, b)])
    monkeypatch.setattr(parallel, "_joined_before", False)
    assert PeerAllReduce.unavailable([0, 1], 0) is None
    assert PeerAllReduce.unavailable([1, 0], 0) is None
    assert "GPU 0 cannot access GPU 2" in PeerAllReduce.unavailable([0, 1, 2], 0)
    monkeypatch.setattr(parallel, "_joined_before", True)
    assert "already joined" in PeerAllReduce.unavailable([0, 1], 0)


def test_lm_head_writes_its_shard_into_out():
    """The decode graphs' shared logits buffer: `out=` takes this rank's shard in place; with
    TP, only ungathered (a gathered result is a new tensor)."""
    import torch.nn.functional as F

    from nv_models.layers.embed_head import ParallelLMHead

    g = torch.Generator().manual_seed(0)
    head = ParallelLMHead(10, 4)
    head.weight.data = torch.randn(10, 4, generator=g)
    hidden = torch.randn(3, 4, generator=g)
    buffer = torch.full((5, 10), float("nan"))
    got = head(hidden, gather=False, out=buffer[:3])
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer[:3], F.linear(hidden, head.weight), rtol=1e-6, atol=1e-6)
    assert buffer[3:].isnan().all()  # rows past the batch untouched
    sharded = ParallelLMHead(10, 4, TPGroup(0, 2, None))
    with pytest.raises(ValueError, match="gather=False"):
        sharded(hidden, out=torch.empty(3, 5))
