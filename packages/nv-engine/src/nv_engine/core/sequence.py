from __future__ import annotations

import enum
import itertools

from nv_engine.sampling_params import SamplingParams

PENDING = -1  # the slot of a token scheduled to be sampled, until it is


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One request: its tokens, its progress and its sampling parameters.

    `num_computed_tokens` counts the leading tokens whose KV is in the cache. A waiting sequence
    (new or preempted) has none; the scheduler computes the rest, possibly over several chunks.
    """

    _ids = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.num_prefill_tokens = 0  # tokens to compute by prefill at the latest admission
        self.num_cached_tokens = 0  # prefix-cache hits at the latest admission
        self.params = params
        self.seed = seed
        # what every scheduled step of this request carries to the sampler
        self.sampling = (params.temperature, params.top_k, params.top_p, params.min_p, seed)
        # EOS and stop token ids, kept from being sampled before min_tokens (set by the scheduler)
        self.min_tokens_banned: tuple[int, ...] = ()
        # bad_words as token ids (set by the engine, which has the tokenizer)
        self.bad_words_ids: tuple[tuple[int, ...], ...] = ()
        # per output token, {token id: logprob} (the sampled token first), when asked for
        self.logprobs: list[dict[int, float]] | None = None if params.logprobs is None else []
        self.cumulative_logprob = 0.0
        # per prompt token, as logprobs (None for the first), when asked for
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            None if params.prompt_logprobs is None else [None]
        )
        self.prompt_ids: tuple[int, ...] | None = None  # made once, for penalties
        # any of the parameters whose plan fields are set per step (the rest take defaults)
        self.has_extras = bool(
            params.min_tokens
            or params.logprobs is not None
            or params.prompt_logprobs is not None
            or params.has_penalties
            or params.shapes_logits
        )
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_sampled_tokens(self) -> int:
        """Output tokens sampled so far (without a slot still being sampled)."""
        return len(self.token_ids) - self.num_prompt_tokens - (self.token_ids[-1] == PENDING)

    @property
    def output_token_ids(self) -> list[int]:
        """Sampled tokens so far (without a slot still being sampled)."""
        end = len(self.token_ids) - (self.token_ids[-1] == PENDING)
        return self.token_ids[self.num_prompt_tokens : end]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, {self.status.name}, tokens={len(self)}, "
            f"computed={self.num_computed_tokens})"
        )
