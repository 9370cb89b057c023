from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from nv_engine.sampling_params import SamplingParams


class PenaltyInputs(NamedTuple):
    """What a penalized row's sampling needs: SamplingParams' penalties and the tokens they look
    at (only requests that use penalties carry their history in the plan)."""

    repetition: float
    frequency: float
    presence: float
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]  # sampled so far, without a token still being sampled


class PromptLogprobsInputs(NamedTuple):
    """A prefill chunk's share of prompt_logprobs: the chunk's first len(targets) positions
    each predict the prompt token in `targets`; `k` most likely tokens come along."""

    k: int
    targets: tuple[int, ...]


class ScheduledSeq(NamedTuple):
    """One sequence's share of a step: compute the KV of `token_ids`, which sit at positions
    start_pos.., through `block_table`; if `sample`, produce the next token from the last one.

    Immutable and cheap to build (a tuple); it pickles compactly for tensor-parallel workers: a
    decode step carries one token, never the whole history. `block_table` is a copy of the
    BlockManager's table as scheduled (the BlockManager owns the live one).
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: tuple[int, ...]
    sample: bool
    # sampling, used on rank 0 only
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    output_index: int = 0
    banned_token_ids: tuple[int, ...] = ()  # masked out of this sample (min_tokens not reached)
    logprobs: int | None = None  # top log-probabilities to return with the sample (None: none)
    penalties: PenaltyInputs | None = None
    prompt_logprobs: PromptLogprobsInputs | None = None  # prefill chunks that ask only
    # logit_bias / allowed_token_ids, read by name by the logits processors (rows that set them)
    params: SamplingParams | None = None
    # bad words' last tokens to ban if the row's input token (still being sampled on the host,
    # known on the device) is the given one: ((input token, banned token), ...)
    conditional_bans: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What the model runner carries out in one step: a prefill step (new prompt tokens, maybe
    chunks, maybe after a cached prefix) or a decode step (one token per running sequence)."""

    is_prefill: bool
    seqs: tuple[ScheduledSeq, ...]
    # some row asks for per-request logits work (min_tokens bans, penalties, logprobs): the
    # runner looks at the rows' fields only then
    has_extras: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    def __reduce__(self):
        # Pickled for tensor-parallel workers on rank 0's critical path, every step: rows as
        # plain tuples pickle in C, where NamedTuples go through __getnewargs__ one by one
        # (256 rows: 0.25 -> 0.09 ms on the development machine; docs/benchmarks.md)
        return _plan_from_tuples, (self.is_prefill, tuple(map(tuple, self.seqs)), self.has_extras)


def _plan_from_tuples(is_prefill: bool, rows: tuple[tuple, ...], has_extras: bool) -> StepPlan:
    return StepPlan(is_prefill, tuple(map(ScheduledSeq._make, rows)), has_extras)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities for one step's sampled rows (host lists, one row per sampled row)."""

    sampled: list[float]  # the sampled token's
    top_ids: list[list[int]]  # the k most likely tokens, most likely first
    top: list[list[float]]  # their log-probabilities

    def entry(self, row: int, token: int, k: int) -> dict[int, float]:
        """Row `row` as {token id: logprob}: `token` (the sampled or target one) first, then
        the k most likely (computed for the step's largest k; trimmed to this request's)."""
        entry = {token: self.sampled[row]}
        for t, v in zip(self.top_ids[row][:k], self.top[row], strict=False):
            entry.setdefault(t, v)
        return entry
