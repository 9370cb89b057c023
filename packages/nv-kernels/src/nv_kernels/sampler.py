from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from nv_kernels.sample_kernel import (
    LOG2E,
    SERIES_BELOW,
    chunk_candidates,
    fused_sample,
    pick_candidates,
)
from nv_kernels.triton_utils import triton


def _to_i64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _to_i64(0x9E3779B97F4A7C15)
_M1 = _to_i64(0xBF58476D1CE4E5B9)
_M2 = _to_i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps on every torch backend, which is what the mixer wants.
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on 32-bit values held in int64: the products fit in 64 bits
    (wrapping into the sign bit is harmless), and the mask keeps the low 32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def vocab_keys(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """Per-token hash offsets (token id times a 32-bit golden ratio), made once."""
    return (torch.arange(vocab_size, device=device, dtype=torch.int64) * _GOLDEN32) & _MASK32


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise `[num_seqs, vocab_size]` in base-2 units (E * log2(e), so times ln 2 it is
    Exp(1)), a pure function of (seed, step, token id): a request's draw does not depend on what
    else is in the batch or on which device runs it. `keys` is `vocab_keys(vocab_size, device)`.
    A 64-bit key per row (splitmix64 of seed and step), then a 32-bit hash per token:
    `sample_kernel` computes the same bits in uint32, and the same noise."""
    row_key = _splitmix64(seeds * _M2 + steps)  # [B]
    lo, hi = (row_key & _MASK32)[:, None], _shr(row_key, 32)[:, None]
    bits = _mix32(_mix32(keys[None, :] ^ lo) ^ hi)  # [B, V], 32-bit values
    return exponential_from_bits(bits)


def exponential_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise in base-2 units, -log2(u), from 32-bit values (u = uniform_from_bits)."""
    u = uniform_from_bits(bits)
    w = 1.0 - u  # exact where it is used (u > 1/2)
    # near u = 1, -log2(u) loses its relative precision (the kernel's fast log2 most): there
    # the series of -ln(1 - w), its relative error under w^3 / 4
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3))) * LOG2E
    return torch.where(w < SERIES_BELOW, series, -torch.log2(u))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 uniform in the open interval (0, 1) from 32-bit values: the top 23 bits, centred
    in their bucket (exact in float32). Never 1, so the Exp(1) noise -log(u) is never 0: a 0
    would give its token an infinite score and a uniformly random pick (once in 2^24 tokens with
    (0, 1], ~1 % of draws over a 151,936-token vocabulary)."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@dataclass(slots=True)
class SamplingTensors:
    """Per-request sampling parameters for one step, one row per sequence.
    Disabled filters use neutral values: top_k = vocab size, top_p = 1, min_p = 0."""

    temperatures: torch.Tensor  # [B] float32; 0 = greedy
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, the request's output position (keeps seeded runs stable)
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool


# SamplingTensors' per-row tensors
_ROW_FIELDS = ("temperatures", "top_k", "top_p", "min_p", "seeds", "steps")


def _in_one_graph(
    compiled: Callable, logits: torch.Tensor, st: SamplingTensors, keys: torch.Tensor
) -> torch.Tensor:
    """`compiled` (`sample` through torch.compile) as one compiled graph, whatever the batch:
    every filter on (a disabled one holds its neutral value and keeps every token), float32
    logits, at least two rows, and tensors that are not views (torch.compile guards on a view's
    base). A new mix of filters, float32 logits after bf16 ones, a lone row (torch.compile
    specialises sizes 0 and 1 even with dynamic shapes) or a view of another size would each
    compile anew: seconds in the middle of serving (docs/benchmarks.md)."""
    rows = logits.shape[0]
    copies = 2 if rows == 1 else 1
    # one copy (not a view) in float32; a bf16 batch's float() is that copy already
    logits = logits.float().repeat(2, 1) if rows == 1 else logits.to(torch.float32, copy=True)
    row_fields = {f: getattr(st, f).repeat(copies) for f in _ROW_FIELDS}  # copies, not views
    st = replace(st, use_top_k=True, use_top_p=True, use_min_p=True, **row_fields)
    return compiled(logits, st, keys)[:rows]


@torch.compiler.disable
def _cumsum(x: torch.Tensor) -> torch.Tensor:
    """`x.cumsum(-1)` run by ATen, outside the compiled sampler: for a few rows and a large
    vocabulary, Inductor (torch 2.11, CUDA) emits a split scan whose code generation fails."""
    return x.cumsum(dim=-1)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus."""
    vocab_size = logits.shape[-1]
    logits_sort, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = logits_sort.gather(1, (vocab_size - top_k).clamp(0, vocab_size - 1)[:, None])
        logits_sort.masked_fill_(logits_sort < kth, float("-inf"))
    if top_p is not None:
        cum = _cumsum(logits_sort.softmax(dim=-1))
        drop = cum <= 1 - top_p[:, None]
        drop[:, -1] = False  # the most likely token always stays
        logits_sort.masked_fill_(drop, float("-inf"))
    return logits_sort.scatter(1, order, logits_sort)


def sample(
    logits: torch.Tensor, st: SamplingTensors, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Next token per row of `logits` `[B, V]`: argmax where temperature is 0, else Gumbel-max
    (argmax of probs / Exp(1), computed in log space) over softmax(logits / T) restricted by
    min-p, top-k and top-p."""
    if st.all_greedy:
        return chunked_argmax(logits)
    greedy_rows = st.temperatures == 0
    temps = torch.where(greedy_rows, 1.0, st.temperatures)
    raw = logits.float()
    logits = raw / temps[:, None]
    if st.use_min_p:
        probs = logits.softmax(dim=-1)
        too_small = probs < st.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(too_small, float("-inf"))
    if st.use_top_k or st.use_top_p:
        logits = apply_top_k_top_p(
            logits, st.top_k if st.use_top_k else None, st.top_p if st.use_top_p else None
        )
    if keys is None:
        keys = vocab_keys(logits.shape[-1], logits.device)
    noise = exponential_noise(st.seeds, st.steps, keys)
    # argmax(probs / E) == argmax(logits / T - ln E) == argmax(logits * log2(e) / T - log2(E'))
    # with E' = E * log2(e): the softmax normaliser is a per-row constant, so the draw needs no
    # softmax pass over the vocabulary; base 2 is what the kernel computes fast. Greedy rows keep
    # their logits (no noise): the filters above never drop a row's most likely token, so one
    # argmax serves both kinds of row. The filtered logits only mask: the scores scale the
    # unscaled logits, as the kernel does.
    sampled = raw * (LOG2E / temps)[:, None] - noise.log2()
    scores = torch.where(greedy_rows[:, None], raw, sampled)
    scores = scores.masked_fill(logits == float("-inf"), float("-inf"))
    return chunked_argmax(scores)


def apply_penalties(
    logits: torch.Tensor,
    in_prompt: torch.Tensor,
    output_counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """float32 logits `[B, V]` after vLLM's penalties, per row: `repetition` divides positive and
    multiplies negative logits of tokens seen in the prompt (`in_prompt`, bool `[B, V]`) or the
    output (`output_counts` > 0, `[B, V]`), as transformers does; then `frequency` times each
    output count and `presence` once per output token are subtracted. Neutral values (1, 0, 0)
    leave a row as it is."""
    logits = logits.float()
    in_output = output_counts > 0
    factor = torch.where(in_prompt | in_output, repetition[:, None], 1.0)
    logits = torch.where(logits > 0, logits / factor, logits * factor)
    return logits - frequency[:, None] * output_counts - presence[:, None] * in_output


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under softmax(logits) `[B, V]`: of each row's token `[B]` (float32),
    and the k largest per row, with their token ids `[B, k]` (most likely first)."""
    logprobs = logits.float().log_softmax(dim=-1)
    top, top_ids = logprobs.topk(k, dim=-1)
    return logprobs.gather(1, tokens[:, None]).squeeze(1), top_ids, top


ARGMAX_CHUNKS = 64


def chunked_argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` for `[B, V]` computed as a max within `ARGMAX_CHUNKS` slices of each row,
    then across them: compiled, a small batch then fills the GPU with B * ARGMAX_CHUNKS programs
    rather than B. Ties go to the lowest index, as with `argmax`."""
    b, v = x.shape
    width = -(-v // ARGMAX_CHUNKS)
    x = torch.nn.functional.pad(x, (0, width * ARGMAX_CHUNKS - v), value=float("-inf"))
    best, idx = x.view(b, ARGMAX_CHUNKS, width).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return (idx.gather(1, chunk) + chunk * width).squeeze(1)


def _draw(st: SamplingTensors | None) -> tuple[torch.Tensor, ...]:
    """The fused kernels' sampling arguments: none when every row is greedy."""
    return () if st is None or st.all_greedy else (st.temperatures, st.seeds, st.steps)


class Sampler:
    """Batched sampler. On CUDA, greedy and temperature-only batches take the fused Triton
    kernels (`sample_kernel.fused_sample`); batches with top-k, top-p or min-p take `sample`,
    compiled with torch.compile. Elsewhere `sample` runs eagerly."""

    def __init__(
        self, device: torch.device | str, compile: bool | None = None, fused: bool | None = None
    ) -> None:
        device = torch.device(device)
        on_cuda = device.type == "cuda"
        if compile is None:
            compile = on_cuda
        self._fused = on_cuda and triton is not None if fused is None else fused
        self._compiled = torch.compile(sample, dynamic=True) if compile else None
        self._keys: torch.Tensor | None = None

    def takes_kernel(self, st: SamplingTensors | None) -> bool:
        """Whether this batch takes the fused kernels (which `sample_sharded` needs)."""
        return self._fused and (st is None or not (st.use_top_k or st.use_top_p or st.use_min_p))

    def __call__(self, logits: torch.Tensor, st: SamplingTensors | None) -> torch.Tensor:
        """`st` None: every row is greedy."""
        if self.takes_kernel(st):
            return fused_sample(logits, *_draw(st))
        if st is None or st.all_greedy:
            return chunked_argmax(logits)
        if self._keys is None or self._keys.shape[0] != logits.shape[-1]:
            self._keys = vocab_keys(logits.shape[-1], logits.device)
        if self._compiled is None:
            return sample(logits, st, self._keys)
        return _in_one_graph(self._compiled, logits, st, self._keys)

    def sample_sharded(
        self,
        logits: torch.Tensor,
        st: SamplingTensors | None,
        vocab_offset: int,
        gather: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The draw of `__call__` from a vocabulary-parallel LM head's shard `[B, V / ranks]`
        (token ids from `vocab_offset`), without gathering the logits: every rank calls it,
        takes its shard's chunk candidates, and gathers everyone's (a few kB) with `gather`
        (a tensor -> every rank's, stacked: `[ranks, *shape]`, as `TPGroup.gather_ranks`),
        from which every rank picks the same tokens. Only for batches that `takes_kernel`."""
        if not self.takes_kernel(st):
            raise ValueError("sample_sharded needs a batch without top-k, top-p or min-p")
        mine = chunk_candidates(logits, *_draw(st), vocab_offset=vocab_offset)
        return pick_candidates(gather(mine))
