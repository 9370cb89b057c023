from __future__ import annotations

import bisect

import torch
from torch import nn

from nv_engine.config import Config
from nv_kernels import AttentionMetadata


class DecodeGraphs:
    """CUDA graphs of the decode forward, one per batch size in `cuda_graph_batch_sizes` (up to
    max_num_seqs), sharing one memory pool. A batch runs in the smallest graph that holds it;
    padding rows write no KV (slot -1) and read one cached token; batches above the largest
    size run eagerly."""

    def __init__(
        self, model: nn.Module, device: torch.device, config: Config, block_size: int
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        sizes = [b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs]
        if not sizes or sizes[-1] < config.max_num_seqs:
            sizes.append(min(config.max_num_seqs, config.cuda_graph_batch_sizes[-1]))
        self.sizes = sorted(set(sizes))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def can_run(self, batch_size: int) -> bool:
        return bool(self.graphs) and batch_size <= self.sizes[-1]

    @torch.inference_mode()
    def capture(self, max_blocks_per_seq: int) -> None:
        n = self.sizes[-1]
        dev = self.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        hidden_size = self.model.model.embed_tokens.weight.shape[1]
        self.outputs = torch.zeros(
            n, hidden_size, device=dev, dtype=self.model.model.embed_tokens.weight.dtype
        )
        pool = None
        for b in reversed(self.sizes):
            meta = self._meta(b)
            self.outputs[:b] = self.model(self.input_ids[:b], self.positions[:b], meta)  # warmup
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.outputs[:b] = self.model(self.input_ids[:b], self.positions[:b], meta)
            if pool is None:
                pool = graph.pool()
            self.graphs[b] = graph
            torch.cuda.synchronize(dev)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            False, self.slot_mapping[:b], self.context_lens[:b], self.block_tables[:b]
        )

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        b = input_ids.shape[0]
        g = self.sizes[bisect.bisect_left(self.sizes, b)]
        self.input_ids[:b] = input_ids
        self.positions[:b] = positions
        self.slot_mapping[:b] = meta.slot_mapping
        self.slot_mapping[b:g] = -1
        self.context_lens[:b] = meta.context_lens
        self.context_lens[b:g] = 1
        width = meta.block_tables.shape[1]
        self.block_tables[:b, :width] = meta.block_tables
        self.graphs[g].replay()
        return self.outputs[:b]
