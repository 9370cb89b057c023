from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist

from nv_engine.config import Config
from nv_engine.cuda_graphs import DecodeGraphs
from nv_engine.plan import StepPlan
from nv_kernels import AttentionMetadata, Sampler, SamplingTensors, get_attention_backend
from nv_models import TPGroup, build_model, init_random_weights, load_weights

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    """One tensor-parallel rank: the model, its shard of the paged KV cache, the decode CUDA
    graphs, and (rank 0) the sampler. `execute(plan)` runs one step; on rank 0 it returns the
    sampled tokens, one per scheduled sequence with sample=True."""

    def __init__(self, config: Config, rank: int = 0, tp: TPGroup = TPGroup()) -> None:
        self.config = config
        self.rank = rank
        self.tp = tp
        self.device = torch.device(config.resolved_device())
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", rank)
            torch.cuda.set_device(self.device)
        self.dtype = config.resolved_dtype(self.device.type)
        self.block_size = config.kvcache_block_size
        hf = config.hf_config
        backend = get_attention_backend(config.attention_backend, self.device)
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = build_model(hf, tp, backend)
        self.model.eval()
        if config.load_format == "dummy":
            init_random_weights(self.model, seed=config.seed)
        else:
            load_weights(self.model, config.model)
        self.vocab_size = hf.vocab_size
        self.sampler = Sampler(self.device) if rank == 0 else None
        self.num_blocks = self._allocate_kv_cache()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.device, config, self.block_size)
            self.graphs.capture(self.max_blocks_per_seq)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.config.max_model_len // self.block_size)

    # ---- KV cache ------------------------------------------------------------------------------

    def _attention_layers(self):
        return [layer.self_attn.attn for layer in self.model.model.layers]

    def _allocate_kv_cache(self) -> int:
        layers = self._attention_layers()
        a = layers[0]
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        block_bytes = 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * itemsize
        num_blocks = self.config.num_kvcache_blocks or self._blocks_from_memory(block_bytes)
        if self.tp.size > 1:  # every rank must agree on the pool
            t = torch.tensor(
                [num_blocks], device=self.device if self.device.type == "cuda" else "cpu"
            )
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tp.group)
            num_blocks = int(t.item())
        if num_blocks < 1:
            raise RuntimeError(
                "no memory left for the KV cache: lower max_num_batched_tokens / max_num_seqs or "
                "raise gpu_memory_utilization"
            )
        shape = (2, len(layers), num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB)",
            num_blocks,
            self.block_size,
            num_blocks * block_bytes / 2**30,
        )
        return num_blocks

    def _blocks_from_memory(self, block_bytes: int) -> int:
        enough = self.config.max_num_seqs * self.max_blocks_per_seq + 1
        if self.device.type != "cuda":
            return max(1, min(self.config.cpu_kvcache_bytes // block_bytes, enough))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        peak = torch.cuda.max_memory_allocated(self.device)
        current = torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # Our share of the card less what this process needs at peak (weights, activations,
        # sampler). Other processes' memory is not charged to our share, but what is actually
        # free bounds us too, keeping room for this process's activations.
        share = total * self.config.gpu_memory_utilization - peak
        available = free - (peak - current) - self.config.cuda_graph_reserve_bytes
        return max(0, int(min(share, available) // block_bytes))

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """The largest prefill step and the largest sampling batch, to measure peak memory."""
        c = self.config
        seq_len = min(c.max_model_len, c.max_num_batched_tokens)
        num_seqs = max(1, min(c.max_num_batched_tokens // seq_len, c.max_num_seqs))
        lens = [seq_len] * num_seqs
        ids = torch.zeros(sum(lens), dtype=torch.int64, device=self.device)
        pos = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        cu = torch.arange(
            0, (num_seqs + 1) * seq_len, seq_len, dtype=torch.int32, device=self.device
        )
        meta = AttentionMetadata(
            True, torch.full_like(ids, -1), None, None, cu, cu, seq_len, seq_len
        )
        self.model(ids, pos, meta)
        if self.sampler is not None:
            n = c.max_num_seqs
            logits = torch.randn(n, self.vocab_size, device=self.device)
            self.sampler(logits, self._sampling_tensors([(1.0, 5, 0.9, 0.1, 0, 0)] * n))
        torch.cuda.synchronize(self.device)

    # ---- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[int] | None:
        if plan.is_prefill:
            ids, pos, meta, logits_indices = self._prepare_prefill(plan)
            hidden = self.model(ids, pos, meta)
        else:
            ids, pos, meta = self._prepare_decode(plan)
            logits_indices = None
            if self.graphs is not None and self.graphs.can_run(len(plan.seqs)):
                hidden = self.graphs.replay(ids, pos, meta)
            else:
                hidden = self.model(ids, pos, meta)
        logits = self.model.compute_logits(hidden, logits_indices)
        if self.sampler is None:
            return None
        rows = [
            (s.temperature, s.top_k, s.top_p, s.min_p, s.seed, s.output_index)
            for s in plan.seqs
            if s.sample
        ]
        if not rows:
            return []
        return self.sampler(logits, self._sampling_tensors(rows)).tolist()

    def _to_device(self, data: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda")
        return t.to(self.device, non_blocking=True)

    def _block_tables(self, plan: StepPlan) -> torch.Tensor:
        width = max(len(s.block_table) for s in plan.seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in plan.seqs]
        return self._to_device(rows, torch.int32)

    def _slots(
        self, block_tables: torch.Tensor, seq_idx: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        bs = self.block_size
        return block_tables[seq_idx, pos // bs].long() * bs + pos % bs

    def _prepare_prefill(self, plan: StepPlan):
        ids: list[int] = []
        lens, starts, logits_indices = [], [], []
        cu_q, cu_k = [0], [0]
        for s in plan.seqs:
            ids.extend(s.token_ids)
            n = len(s.token_ids)
            lens.append(n)
            starts.append(s.start_pos)
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + s.start_pos + n)
            if s.sample:
                logits_indices.append(cu_q[-1] - 1)
        block_tables = self._block_tables(plan)
        # per-token positions and slots, computed on the device from per-sequence numbers
        lens_t = self._to_device(lens)
        seq_idx = torch.repeat_interleave(
            torch.arange(len(lens), device=self.device), lens_t, output_size=len(ids)
        )
        cu_q_t = self._to_device(cu_q, torch.int32)
        offset = self._to_device(starts) - cu_q_t[:-1].long()
        pos = torch.arange(len(ids), device=self.device) + offset[seq_idx]
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._slots(block_tables, seq_idx, pos),
            block_tables=block_tables if any(starts) else None,
            cu_seqlens_q=cu_q_t,
            cu_seqlens_k=self._to_device(cu_k, torch.int32),
            max_seqlen_q=max(lens),
            max_seqlen_k=max(st + n for st, n in zip(starts, lens, strict=True)),
        )
        return self._to_device(ids), pos, meta, self._to_device(logits_indices)

    def _prepare_decode(self, plan: StepPlan):
        ids = [s.token_ids[0] for s in plan.seqs]
        positions = [s.start_pos for s in plan.seqs]
        block_tables = self._block_tables(plan)
        pos = self._to_device(positions)
        seq_idx = torch.arange(len(ids), device=self.device)
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=self._slots(block_tables, seq_idx, pos),
            context_lens=(pos + 1).to(torch.int32),
            block_tables=block_tables,
        )
        return self._to_device(ids), pos, meta

    def _sampling_tensors(self, rows: list[tuple]) -> SamplingTensors:
        temps, top_k, top_p, min_p, seeds, steps = zip(*rows, strict=True)
        v = self.vocab_size
        top_k = [k if 0 < k < v else v for k in top_k]
        f32 = torch.float32
        return SamplingTensors(
            temperatures=self._to_device(list(temps), f32),
            top_k=self._to_device(top_k),
            top_p=self._to_device(list(top_p), f32),
            min_p=self._to_device(list(min_p), f32),
            seeds=self._to_device(list(seeds)),
            steps=self._to_device(list(steps)),
            all_greedy=all(t == 0 for t in temps),
            use_top_k=any(k < v for k in top_k),
            use_top_p=any(p < 1 for p in top_p),
            use_min_p=any(p > 0 for p in min_p),
        )
