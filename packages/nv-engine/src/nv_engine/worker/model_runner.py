from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from nv_engine.config import Config, local_device_index
from nv_engine.core.plan import PenaltyInputs, ScheduledSeq, StepPlan
from nv_engine.core.sequence import PENDING
from nv_engine.worker.cuda_graphs import DecodeGraphs
from nv_engine.worker.logits_processors import penalized, process_logits, prompt_logprobs
from nv_engine.worker.profiler import RankProfiler
from nv_engine.worker.staging import DeviceToHost, HostToDevice, SampledTokens
from nv_kernels import (
    SKINNY_DISPATCH_ROWS,
    AttentionMetadata,
    Sampler,
    SamplingTensors,
    SharedPrefix,
    allocate_kv_cache,
    eager_decode_widths,
    get_attention_backend,
    skinny_variant_rows,
    token_logprobs,
)
from nv_models import Attention, TPGroup, build_model, init_random_weights, load_weights

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
    graphs, and the sampler (every rank draws plain batches from its vocabulary shard; rank 0
    alone samples the others). `execute(plan)` runs one step; on rank 0 it returns the sampled
    tokens, one per scheduled sequence with sample=True."""

    def __init__(self, config: Config, rank: int = 0, tp: TPGroup = TPGroup()) -> None:
        self.config = config
        self.rank = rank
        self.tp = tp
        self.device = torch.device(config.resolved_device())
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", local_device_index(rank))
            torch.cuda.set_device(self.device)
        self.dtype = config.resolved_dtype(self.device.type)
        self.kv_dtype = config.resolved_kv_cache_dtype(self.dtype)
        self.block_size = config.kvcache_block_size
        self.profiler = RankProfiler(rank, self.device)  # start_profile() / stop_profile()
        hf = config.hf_config
        backend = get_attention_backend(config.attention_backend, self.device)
        if self.kv_dtype != self.dtype:
            _check_fp8_kv(config, backend, self.device)
        # decode steps with a long shared prefix take cascade attention (_shared_prefix), in
        # their CUDA graphs (eagerly, the host's work outweighed the saving: docs/benchmarks.md)
        cascade = backend.shared_prefix_decode and config.tuning.shared_prefix_min_tokens > 0
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = build_model(hf, tp, backend)
        self.model.eval()
        if config.load_format == "dummy":
            init_random_weights(self.model, seed=config.seed)
        else:
            load_weights(self.model, config.model)
        self.vocab_size = hf.vocab_size
        # every rank samples a plain batch from its shard of the logits (see _sample)
        self.sampler = Sampler(self.device, fused=config.tuning.fused_sampler)
        self.staging = HostToDevice(1 << 20, self.device)
        self._readback = DeviceToHost(config.max_num_seqs, self.device)
        # the last step's sampled tokens (on the device) and the rows they were sampled for
        self._last_sampled: tuple[torch.Tensor, list[ScheduledSeq]] | None = None
        # with TP and overlapped scheduling, rank 0 broadcasts them when the workers did not
        # draw them too (see _sample)
        self._shares_sampled = tp.size > 1 and config.async_scheduling
        self.num_blocks = self._allocate_kv_cache()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager and backend.cuda_graph_safe:
            self.graphs = DecodeGraphs(self.model, self.device, config, cascade)
            self.graphs.capture(self.max_blocks_per_seq)
        if self.device.type == "cuda":
            self._warm_up_prefill()
            if self.graphs is None:
                self._warm_up_eager_decode()
            self._warm_up_sampler()

    def close(self, drain_timeout_s: float | None = None) -> None:
        """Drop the model, KV cache and graphs and hand the memory back to the device. With
        `drain_timeout_s` (a peer rank died and the group was aborted), the memory goes back
        only if the device finishes its queued work in that time: freeing device memory waits
        for the device, and a collective still stuck on the dead peer would make that wait
        forever. The process's exit frees it then."""
        drained = self._drained(drain_timeout_s)
        if not drained and self.tp.peer is not None:
            self.tp.peer.abandon()  # its barrier may wait on the dead peer forever
        if self.graphs is not None:
            self.graphs.close()
        self.graphs = None
        for layer in self._attention_layers():
            layer.k_cache = layer.v_cache = torch.tensor([])
        self.kv_cache = self.model = self.sampler = None
        self.staging = self._readback = self._last_sampled = None
        gc.collect()
        if self.device.type == "cuda" and drained:
            torch.cuda.empty_cache()

    def _drained(self, timeout_s: float | None) -> bool:
        if self.device.type != "cuda" or timeout_s is None:
            return True
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        deadline = time.monotonic() + timeout_s
        # the peer-memory barriers would wait for the dead peer forever: release them
        release = self.tp.peer.release_peers if self.tp.peer is not None else None
        while not done.query():
            if release is not None:
                try:
                    release()
                except Exception:  # best effort: close() must complete, the drain is bounded
                    logger.warning("releasing the peer-memory barriers failed", exc_info=True)
                    release = None
            if time.monotonic() > deadline:
                logger.warning(
                    "the device did not finish its queued work within %.0f s of a peer rank's "
                    "death; its memory is freed when this process exits",
                    timeout_s,
                )
                return False
            time.sleep(0.01)
        return True

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.config.max_model_len // self.block_size)

    # ---- KV cache ------------------------------------------------------------------------------

    def _attention_layers(self) -> list[Attention]:
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def _allocate_kv_cache(self) -> int:
        layers = self._attention_layers()
        a = layers[0]
        itemsize = torch.empty((), dtype=self.kv_dtype).element_size()
        block_bytes = 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * itemsize
        num_blocks = self.config.num_kvcache_blocks
        if num_blocks is None:
            num_blocks = self._blocks_from_memory(block_bytes)
            cap = self.config.tuning.max_num_kvcache_blocks
            if num_blocks > cap:
                logger.warning(
                    "KV cache: memory for %d blocks, capped at max_num_kvcache_blocks=%d (a "
                    "larger kvcache_block_size uses all of it)",
                    num_blocks,
                    cap,
                )
                num_blocks = cap
        if self.tp.size > 1:  # every rank must agree on the pool
            t = torch.tensor([num_blocks], device=self.device)
            num_blocks = int(self.tp.all_reduce(t, op=dist.ReduceOp.MIN).item())
        if num_blocks < 1:  # a ValueError, as vLLM's: the settings ask for too much
            raise ValueError(
                "no memory left for the KV cache: lower max_num_batched_tokens / max_num_seqs or "
                "raise gpu_memory_utilization"
            )
        self.kv_cache = allocate_kv_cache(
            len(layers), num_blocks, self.block_size, a.num_kv_heads, a.head_dim, self.kv_dtype,
            self.device,
        )  # fmt: skip
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0][i], self.kv_cache[1][i]
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB, %s)",
            num_blocks,
            self.block_size,
            num_blocks * block_bytes / 2**30,
            self.kv_dtype,
        )
        return num_blocks

    def _blocks_from_memory(self, block_bytes: int) -> int:
        enough = self.config.max_num_seqs * self.max_blocks_per_seq + 1
        if self.device.type != "cuda":
            return max(1, min(self.config.tuning.cpu_kvcache_bytes // block_bytes, enough))
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
        available = free - (peak - current) - self.config.tuning.cuda_graph_reserve_bytes
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
        if self.rank == 0:  # the workers sample only from their shard: a few kB
            # every filter on: the sampler's largest footprint
            self._sample_random(c.max_num_seqs, temperature=1.0, top_k=5, top_p=0.9, min_p=0.1)
            self._profile_logits_processors()
        torch.cuda.synchronize(self.device)

    def _profile_logits_processors(self) -> None:
        """Penalties and logprobs on every row of the largest batch (or of a prompt-logprobs
        chunk): their [rows, vocab] temporaries, the largest footprint of the rarer work."""
        c = self.config
        n = max(c.max_num_seqs, c.tuning.prompt_logprobs_chunk)
        row = ScheduledSeq(0, [0], 0, [0], True, penalties=PenaltyInputs(1.1, 0.1, 0.1, (0,), (0,)))
        logits = torch.randn(n, self.vocab_size, device=self.device, dtype=self.dtype)
        logits = penalized(logits, [row] * n, None)
        token_logprobs(
            logits, torch.zeros(n, dtype=torch.int64, device=self.device), c.max_logprobs
        )

    @torch.inference_mode()
    def _warm_up_prefill(self) -> None:
        """Compile now, not in a step, what eager prefill steps run: the prefill kernels that
        read earlier tokens from the cache (prefix hits, chunked prefill); for small steps
        every variant of the layers' skinny GEMM (`skinny_variant_rows`, by the step's token
        count); past them, two sizes, since the compiled elementwise ops between cuBLAS GEMMs
        (`compile_on_cuda`) turn dynamic on their second shape; the LM head's skinny GEMM
        variants. A compile mid-serving stalls every request, and with a dead tensor-parallel
        peer it never loads."""
        dev = self.device
        for n in (*skinny_variant_rows(), SKINNY_DISPATCH_ROWS + 1, SKINNY_DISPATCH_ROWS + 2):
            cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
            self._forward_writing_nothing(
                torch.arange(n, device=dev), is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                max_seqlen_q=n, max_seqlen_k=n,
            )  # fmt: skip
        # the LM head projects a step's sampled rows (skinny GEMMs up to SKINNY_DISPATCH_ROWS):
        # decode graphs compile its variants as they capture them; without graphs, eager
        # decode steps would compile them in a step
        width = self.config.hf_config.hidden_size
        hidden = torch.zeros(SKINNY_DISPATCH_ROWS, width, dtype=self.dtype, device=dev)
        for n in skinny_variant_rows():
            self.model.compute_logits(hidden[:n], gather=False)
        n, ctx = 16, self.block_size + 16
        self._forward_writing_nothing(
            torch.arange(n, device=dev),  # any positions in the table
            is_prefill=True,
            block_tables=torch.zeros(1, -(-ctx // self.block_size), dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
            cu_seqlens_k=torch.tensor([0, ctx], dtype=torch.int32, device=dev),
            max_seqlen_q=n,
            max_seqlen_k=ctx,
        )

    @torch.inference_mode()
    def _warm_up_eager_decode(self) -> None:
        """Without CUDA graphs: compile now what eager decode steps run. The decode attention
        kernel's split count is a compile-time constant that follows the batch and its widest
        block table; one sequence over the tables of `eager_decode_widths` takes every value an
        eager step can."""
        dev = self.device
        for width in eager_decode_widths(self.max_blocks_per_seq):
            ctx = width * self.block_size
            self._forward_writing_nothing(
                torch.tensor([ctx - 1], device=dev),
                is_prefill=False,
                context_lens=torch.tensor([ctx], dtype=torch.int32, device=dev),
                block_tables=torch.zeros(1, width, dtype=torch.int32, device=dev),
            )

    def _forward_writing_nothing(self, positions: torch.Tensor, **meta: Any) -> None:
        """A forward of token 0 at `positions` for the warm-ups: every cache slot is -1 (no
        K/V written); `meta`, the rest of its AttentionMetadata (block tables read block 0)."""
        n = positions.shape[0]
        slots = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.model(ids, positions, AttentionMetadata(slot_mapping=slots, **meta))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _warm_up_sampler(self) -> None:
        """Compile the sampler's kernels (greedy, temperature only) for every path a step takes
        here (with TP: sharded on every rank, whole on rank 0) now, not in a step: a kernel
        compiled during a step loads a module, which waits for the device, and with a
        tensor-parallel peer dead the device never finishes its collective (a step after a
        worker's death hung there on the card, instead of raising WorkerError)."""
        for temperature in (0.0, 0.7):
            sampling = dict(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)
            if self.rank == 0:
                self._sample_random(3, **sampling)
                # penalties hand the sampler float32 logits: another kernel variant
                self._sample_random(3, dtype=torch.float32, **sampling)
            if self.tp.size > 1:
                self._sample_random(3, sharded=True, **sampling)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _sample_random(
        self, n: int, sharded: bool = False, dtype: torch.dtype | None = None, **sampling: float
    ) -> None:
        """Sample once from random logits (of the model's dtype unless `dtype`) for `n` rows
        with the same sampling parameters; with `sharded`, from this rank's vocabulary shard,
        as `_sample` does (every rank calls it)."""
        row = ScheduledSeq(0, [0], 0, [0], True, **sampling)
        build = self._add_sampling([row] * n)
        width = self.vocab_size // self.tp.size if sharded else self.vocab_size
        logits = torch.randn(n, width, device=self.device, dtype=dtype or self.dtype)
        st = build(self.staging.send())
        if sharded:
            self._sample_sharded(logits, st)
        else:
            self.sampler(logits, st)

    # ---- one step ------------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> list[int] | None:
        """Run one step and wait for it; on rank 0 return the sampled tokens."""
        out = self.launch(plan)
        return None if out is None else out.tolist()

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> SampledTokens | None:
        """Queue one step on the device without waiting for it. On rank 0 returns the sampled
        tokens (one per scheduled sequence with sample=True) as a `SampledTokens` to collect
        later. Decode rows whose input token is still `PENDING` take it, on the device, from the
        previous step's sampled tokens."""
        rows = [s for s in plan.seqs if s.sample]
        prompt_lps = None
        if plan.is_prefill:
            ids, pos, meta, logits_indices, st = self._prepare_prefill(plan, rows)
            hidden = self.model(ids, pos, meta)
            # with TP, this rank's vocabulary shard (see _sample)
            logits = self.model.compute_logits(hidden, logits_indices, gather=False)
            if plan.has_extras and any(s.prompt_logprobs is not None for s in plan.seqs):
                chunk = self.config.tuning.prompt_logprobs_chunk
                prompt_lps = prompt_logprobs(self.model, hidden, plan, chunk, self.rank == 0)
        else:
            use_graph = self.graphs is not None and self.graphs.can_run(len(plan.seqs))
            padded = self.graphs.padded_size(len(plan.seqs)) if use_graph else len(plan.seqs)
            cascade = use_graph and padded in self.graphs.cascade_sizes
            shared = self._shared_prefix(plan) if cascade else None
            ids, pos, meta, st = self._prepare_decode(plan, padded, rows, shared)
            if use_graph:
                logits = self.graphs.replay(ids, pos, meta)[: len(plan.seqs)]
            else:
                logits = self.model.compute_logits(self.model(ids, pos, meta), gather=False)
        sampled = logprobs = None
        if rows:  # one logits row per sampled row (prefill projects only those)
            inputs = (ids[logits_indices] if plan.is_prefill else ids) if plan.has_extras else None
            sampled, logprobs = self._sample(plan, rows, logits, inputs, st)
        self._last_sampled = None if sampled is None else (sampled, rows)
        if self.rank != 0 or (sampled is None and prompt_lps is None):
            return None
        if sampled is None:  # a prefill step of unfinished chunks only
            sampled = torch.empty(0, dtype=torch.int64, device=self.device)
        return self._readback.send(sampled, logprobs, prompt_lps)

    def _sample(
        self,
        plan: StepPlan,
        rows: list[ScheduledSeq],
        logits: torch.Tensor,
        inputs: torch.Tensor | None,
        st: SamplingTensors | None,
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """The rows' tokens (and log-probabilities, where asked for) from this rank's logits,
        which are its vocabulary shard with TP. A plain batch (no per-request logits
        processing, no top-k/p or min-p) is drawn on every rank from its shard
        (`Sampler.sample_sharded`): no logits gathered, every rank gets the tokens. Otherwise
        the logits are gathered and rank 0 samples; with overlapped scheduling it broadcasts
        the tokens to the workers (their next inputs). The workers return None then."""
        if self.tp.size > 1 and not plan.has_extras and self.sampler.takes_kernel(st):
            return self._sample_sharded(logits, st), None
        logits = self.tp.gather_last_dim(logits)
        if self.rank != 0:
            return self._receive_sampled(len(rows)), None
        raw = logits
        if plan.has_extras:  # the rows' per-request fields are looked at only then
            logits = process_logits(logits, rows, inputs)
        sampled = self.sampler(logits, st)
        if self._shares_sampled:
            self.tp.broadcast(sampled)
        logprobs = None
        if plan.has_extras and any(s.logprobs is not None for s in rows):
            logprobs = token_logprobs(raw, sampled, max(s.logprobs or 0 for s in rows))
        return sampled, logprobs

    def _receive_sampled(self, num_rows: int) -> torch.Tensor | None:
        """A worker's copy of the step's sampled tokens, for the next step's pending inputs:
        with overlapped scheduling the next plan reaches the workers before the host knows the
        tokens, so rank 0 broadcasts them on the device, queued behind its sampler."""
        if not self._shares_sampled:
            return None
        return self.tp.broadcast(torch.empty(num_rows, dtype=torch.int64, device=self.device))

    def _sample_sharded(self, logits: torch.Tensor, st: SamplingTensors | None) -> torch.Tensor:
        """Every rank's draw from its vocabulary shard `[B, V / ranks]` (`sample_sharded`)."""
        start = self.tp.rank * logits.shape[-1]
        return self.sampler.sample_sharded(logits, st, start, self.tp.gather_ranks)

    def _pending_inputs(self, plan: StepPlan) -> list[int] | None:
        """For each row, the index of its input token among the previous step's sampled tokens,
        or -1 where the host knows it; None when no row is pending."""
        if self._last_sampled is None or all(s.token_ids[0] != PENDING for s in plan.seqs):
            return None
        where = {s.seq_id: i for i, s in enumerate(self._last_sampled[1])}
        return [where[s.seq_id] if s.token_ids[0] == PENDING else -1 for s in plan.seqs]

    def _prepare_prefill(self, plan: StepPlan, rows: list[ScheduledSeq]):
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_q, cu_k, logits_indices = [0], [0], []
        bs = self.block_size
        tables = []
        for s in plan.seqs:
            n = len(s.token_ids)
            start, end = s.start_pos, s.start_pos + n
            ids += s.token_ids
            positions += range(start, end)
            table = s.block_table
            for b in range(start // bs, -(-end // bs)):  # one range per touched block
                lo, hi = max(start, b * bs), min(end, (b + 1) * bs)
                base = table[b] * bs - b * bs
                slots += range(base + lo, base + hi)
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + end)
            if s.sample:
                logits_indices.append(cu_q[-1] - 1)
            tables.append(table)
        with_prefix = any(s.start_pos for s in plan.seqs)
        src = self._pending_inputs(plan)  # decode rows of a mixed step: their first token
        h = self.staging
        at = {  # each staged array's index among the sent parts, by name
            name: h.add(data, torch.int64)
            for name, data in (
                ("ids", ids),
                ("positions", positions),
                ("slots", slots),
                ("logits_indices", logits_indices),
            )
        }
        at["cu_q"] = h.add(cu_q, torch.int32)
        at["cu_k"] = h.add(cu_k, torch.int32)
        if with_prefix:
            width = max(len(t) for t in tables)
            at["tables"] = h.add(_padded_rows(tables, width), torch.int32)
        if src is not None:
            where = [cu_q[i] for i, j in enumerate(src) if j >= 0]
            at["pending"] = h.add(where + [j for j in src if j >= 0], torch.int64)
        sampling = self._add_sampling(rows)
        parts = h.send()
        ids_t = parts[at["ids"]]
        if src is not None:  # tokens still being sampled, from the previous step's output
            where_t, src_t = parts[at["pending"]].view(2, -1)
            ids_t.index_copy_(0, where_t, self._last_sampled[0][src_t])
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=parts[at["slots"]],
            block_tables=parts[at["tables"]].view(len(tables), -1) if with_prefix else None,
            cu_seqlens_q=parts[at["cu_q"]],
            cu_seqlens_k=parts[at["cu_k"]],
            max_seqlen_q=max(len(s.token_ids) for s in plan.seqs),
            max_seqlen_k=max(s.start_pos + len(s.token_ids) for s in plan.seqs),
        )
        positions_t, logits_indices_t = parts[at["positions"]], parts[at["logits_indices"]]
        return ids_t, positions_t, meta, logits_indices_t, sampling(parts)

    def _shared_prefix(self, plan: StepPlan) -> tuple[list[int], list[int]] | None:
        """For a decode step that a cascade graph can run: the cache blocks that most rows'
        contexts start with, before each one's newest token, and which rows (1 or 0 per row),
        when cascade attention takes them (enough rows and tokens,
        EngineTuning.shared_prefix_min_*); else None. Requests prefilled in one step hold copies
        of their common prefix, so a few rows may not share the one the others do."""
        tuning, seqs, bs = self.config.tuning, plan.seqs, self.block_size
        firsts = Counter(s.block_table[0] for s in seqs if s.start_pos >= bs)
        if not firsts:
            return None
        head, count = firsts.most_common(1)[0]
        if count < tuning.shared_prefix_min_seqs:
            return None
        rows = [int(s.start_pos >= bs and s.block_table[0] == head) for s in seqs]
        members = [s for s, r in zip(seqs, rows, strict=True) if r]
        limit = min(s.start_pos for s in members) // bs  # whole blocks before the newest tokens
        first = members[0].block_table
        n = 1
        while n < limit and all(s.block_table[n] == first[n] for s in members):
            n += 1
        return (first[:n], rows) if n * bs >= tuning.shared_prefix_min_tokens else None

    def _prepare_decode(
        self,
        plan: StepPlan,
        padded: int,
        rows: list[ScheduledSeq],
        shared: tuple[list[int], list[int]] | None = None,
    ):
        """Inputs for `padded` rows: the plan's sequences, then padding rows that read one cached
        token and write none (slot -1); `shared`, a shared prefix's blocks and rows (for the
        cascade graphs). One staged copy."""
        bs = self.block_size
        n = len(plan.seqs)
        pad = padded - n
        ids = [s.token_ids[0] for s in plan.seqs]
        positions = [s.start_pos for s in plan.seqs]
        tables = [s.block_table for s in plan.seqs]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        width = max(map(len, tables))
        src = self._pending_inputs(plan)
        h = self.staging
        # ids, positions, slots | context lengths | block tables | pending rows' sources: the
        # tables are a part of their own, 16-byte aligned (Triton specialises kernels on pointer
        # alignment: tables after an odd number of lengths compiled new variants in steps)
        i64_at = h.add(ids + [0] * pad + positions + [0] * pad + slots + [-1] * pad, torch.int64)
        lens_at = h.add([p + 1 for p in positions] + [1] * pad, torch.int32)
        tables_at = h.add(_padded_rows(tables, width), torch.int32)
        if src is not None:
            pending = h.add(src + [-1] * pad, torch.int64)
        if shared is not None:
            blocks, members = shared
            prefix_at = h.add([len(blocks) * bs, *blocks], torch.int32)
            members_at = h.add(members + [0] * pad, torch.int32)
        sampling = self._add_sampling(rows)
        parts = h.send()
        ids_t, pos_t, slots_t = parts[i64_at].view(3, padded)
        if src is not None:
            src_t = parts[pending]
            prev = self._last_sampled[0]
            ids_t = torch.where(src_t >= 0, prev[src_t.clamp(min=0)], ids_t)
        meta = AttentionMetadata(False, slots_t, parts[lens_at], parts[tables_at].view(n, width))
        if shared is not None:
            prefix = parts[prefix_at]  # the length, then the blocks
            meta.shared_prefix = SharedPrefix(prefix[:1], prefix[1:], parts[members_at])
        return ids_t, pos_t, meta, sampling(parts)

    def _add_sampling(self, rows: list[ScheduledSeq]):
        """Stage the rows' sampling parameters with the step's inputs; returns a function that
        builds the SamplingTensors from the sent parts (None when every row is greedy)."""
        if not rows:
            return lambda parts: None
        v = self.vocab_size
        temps = [s.temperature for s in rows]
        if max(temps) == 0:
            return lambda parts: None
        top_k = [s.top_k for s in rows]
        top_p = [s.top_p for s in rows]
        min_p = [s.min_p for s in rows]
        seeds = [s.seed for s in rows]
        steps = [s.output_index for s in rows]
        top_k = [k if 0 < k < v else v for k in top_k]
        h = self.staging
        # one aligned part per field: the compiled sampler sees the same layout every step
        i = h.add(temps, torch.float32)
        for column in (top_p, min_p):
            h.add(column, torch.float32)
        for column in (top_k, seeds, steps):
            h.add(column, torch.int64)

        def build(parts: list[torch.Tensor]) -> SamplingTensors:
            return SamplingTensors(
                temperatures=parts[i],
                top_p=parts[i + 1],
                min_p=parts[i + 2],
                top_k=parts[i + 3],
                seeds=parts[i + 4],
                steps=parts[i + 5],
                all_greedy=False,
                use_top_k=min(top_k) < v,
                use_top_p=min(top_p) < 1,
                use_min_p=max(min_p) > 0,
            )

        return build


def _check_fp8_kv(config: Config, backend, device: torch.device) -> None:
    """A clear error where an fp8 KV cache cannot run: a backend without it, or a GPU without
    fp8 conversions (compute capability below 8.9)."""
    what = f"kv_cache_dtype={config.kv_cache_dtype!r}"
    if not backend.supports_fp8_kv:
        raise ValueError(
            f"{what} is not supported by attention_backend={backend.name!r}; use triton or torch"
        )
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(
                f"{what} needs a GPU with fp8 support (compute capability 8.9 or newer); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}"
            )


def _padded_rows(tables: list[list[int]], width: int) -> list[int]:
    flat: list[int] = []
    zeros = [0] * width
    for t in tables:
        flat += t
        flat += zeros[: width - len(t)]
    return flat
