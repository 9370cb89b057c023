from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import nn

from nv_engine.config import Config
from nv_kernels import AttentionMetadata, SharedPrefix, overlapped_launches

logger = logging.getLogger(__name__)


class DecodeGraphs:
    """CUDA graphs of the decode step (forward and LM head, whose vocabulary shards are not
    gathered: see ModelRunner._sample), one per batch size in
    `cuda_graph_batch_sizes` up to max_num_seqs, sharing one memory pool. A batch runs in the
    smallest graph that holds it; padding rows write no KV (slot -1) and read one cached token.
    Batches above the largest size run eagerly.

    Graphs of up to `config.tuning.pdl_max_batch_size` rows launch nv's kernels with programmatic
    dependent launch (`overlapped_launches`, Hopper and newer): each kernel starts, and loads its
    weights, while the one before it finishes; small batches gain most (`benchmarks/pdl_sweep.py`,
    numbers in docs/benchmarks.md).

    With `cascade`, sizes of at least `shared_prefix_min_seqs` rows get a second graph that
    runs cascade attention (AttentionMetadata.shared_prefix: the prefix most rows share read
    once for them), for the steps whose rows share one (ModelRunner._shared_prefix)."""

    def __init__(
        self, model: nn.Module, device: torch.device, config: Config, cascade: bool = False
    ) -> None:
        self.model = model
        self.device = device
        sizes = [b for b in config.tuning.cuda_graph_batch_sizes if b <= config.max_num_seqs]
        if not sizes or sizes[-1] < config.max_num_seqs:
            sizes.append(min(config.max_num_seqs, config.tuning.cuda_graph_batch_sizes[-1]))
        self.sizes = sorted(set(sizes))
        min_rows = config.tuning.shared_prefix_min_seqs
        self.cascade_sizes = {b for b in self.sizes if b >= min_rows} if cascade else set()
        self.pdl_max_batch_size = config.tuning.pdl_max_batch_size
        # (batch size, cascade) -> (graph, its logits: a view of self.logits)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def close(self) -> None:
        """Free every graph now, even while something still references this object: NCCL's
        teardown waits while a graph that captured its collectives is alive."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def can_run(self, batch_size: int) -> bool:
        return bool(self.graphs) and batch_size <= self.sizes[-1]

    def padded_size(self, batch_size: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, batch_size)]

    @torch.inference_mode()
    def capture(self, max_blocks_per_seq: int) -> None:
        start, reserved = time.monotonic(), torch.cuda.memory_reserved(self.device)
        self._allocate_inputs(max_blocks_per_seq)
        pool = None
        for b in reversed(self.sizes):
            for cascade in (False, True) if b in self.cascade_sizes else (False,):
                self._forward(b, cascade)  # warm up (and compile) outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    out = self._forward(b, cascade)
                self.graphs[b, cascade] = (graph, out)  # out: self.logits[:b]
                if pool is None:
                    pool = graph.pool()
                torch.cuda.synchronize(self.device)
        logger.info(
            "CUDA graphs: %d captured (batch sizes up to %d) in %.1f s, %.2f GiB",
            len(self.graphs),
            self.sizes[-1],
            time.monotonic() - start,
            (torch.cuda.memory_reserved(self.device) - reserved) / 2**30,
        )

    def _allocate_inputs(self, max_blocks_per_seq: int) -> None:
        """The buffers every graph reads its inputs from (replay copies a step's in)."""
        n = self.sizes[-1]
        dev = self.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.prefix_len = torch.zeros(1, dtype=torch.int32, device=dev)
        self.prefix_blocks = torch.zeros(max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.prefix_rows = torch.zeros(n, dtype=torch.int32, device=dev)
        # every graph writes its logits here (rows [:b]): one buffer, not one per graph in the
        # pool, which would hold every size's rows times the vocabulary at once; replays run
        # one at a time on one stream, each read by its step's sampler before the next
        head = self.model.lm_head.weight
        self.logits = torch.empty(n, head.shape[0], dtype=head.dtype, device=dev)

    def _forward(self, b: int, cascade: bool) -> torch.Tensor:
        meta = AttentionMetadata(
            False, self.slot_mapping[:b], self.context_lens[:b], self.block_tables[:b]
        )
        if cascade:
            meta.shared_prefix = SharedPrefix(
                self.prefix_len, self.prefix_blocks, self.prefix_rows[:b]
            )
        with overlapped_launches(b <= self.pdl_max_batch_size):
            hidden = self.model(self.input_ids[:b], self.positions[:b], meta)
            # TP: this rank's shard
            return self.model.compute_logits(hidden, gather=False, out=self.logits[:b])

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Inputs already padded to a captured size (see `padded_size`), except the block table,
        which has only the real rows. With `meta.shared_prefix`, the cascade graph (the
        size must have one: `cascade_sizes`)."""
        g = input_ids.shape[0]
        rows, width = meta.block_tables.shape
        self.input_ids[:g] = input_ids
        self.positions[:g] = positions
        self.slot_mapping[:g] = meta.slot_mapping
        self.context_lens[:g] = meta.context_lens
        self.block_tables[:rows, :width] = meta.block_tables
        shared = meta.shared_prefix
        if shared is not None:
            self.prefix_len.copy_(shared.length)
            self.prefix_blocks[: shared.blocks.shape[0]] = shared.blocks
            self.prefix_rows[:g] = shared.rows
        graph, logits = self.graphs[g, shared is not None]
        graph.replay()
        return logits
