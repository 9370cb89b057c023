from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """How one request samples and when it stops (vLLM's fields and meanings).

    - Sampling: `temperature` 0 is greedy. `top_k` 0 or -1, `top_p` 1 and `min_p` 0 disable
      theirs. `seed` makes this request's samples the same whatever else is batched with it.
    - Penalties act on the logits before temperature. `repetition_penalty` (1: off) divides
      positive and multiplies negative logits of tokens in the prompt or output, as
      transformers does. `frequency_penalty` subtracts itself times a token's count in the
      output, `presence_penalty` itself once for any output token (OpenAI's).
    - Stopping: `max_tokens` output tokens at most (None: until the model's length, vLLM's
      meaning); `stop` strings end the output and are left out of its text (unless
      `include_stop_str_in_output`). `stop_token_ids` end it, the token kept in token_ids.
      Before `min_tokens`, no EOS or stop token id is sampled and no stop string ends it.
    - Shaping the distribution (vLLM's): `logit_bias` ({token id: bias in [-100, 100]}) is
      added to the logits; `allowed_token_ids` keeps only those tokens; `bad_words` are never
      generated (each word's last token is banned when the output ends with the rest of it;
      words are tokenized with and without a leading space).
    - Output: `logprobs` returns, per output token, the log-probabilities (of the model's raw
      distribution, as vLLM) of the sampled token and of the `logprobs` most likely (0: the
      sampled one only). `prompt_logprobs` does the same for every prompt token after the
      first; such a request computes its whole prompt (no prefix-cache hits).
      `skip_special_tokens` leaves special tokens out of the text.
    - `n` completions per prompt (`LLM.generate` / `chat`), the i-th seeded with seed + i when
      a seed is given.
    """

    temperature: float = 1.0
    max_tokens: int | None = 64
    ignore_eos: bool = False
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = field(default=None)
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, float)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_number("n", self.n, int)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens is not None:
            _check_number("max_tokens", self.max_tokens, int)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        _check_number("min_tokens", self.min_tokens, int)
        if self.min_tokens < 0 or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        _check_number("top_k", self.top_k, int)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        _check_number("top_p", self.top_p, float)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p, float)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_number("seed", self.seed, int)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, int)
                if value < 0:
                    raise ValueError(f"{name} must be >= 0 (or None), got {value}")
        _check_number("repetition_penalty", self.repetition_penalty, float)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check_number(name, value, float)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError("logit_bias must be a dict of {token id: bias}")
            for t, b in self.logit_bias.items():
                _token_id("logit_bias", t)
                _check_number("logit_bias", b, float)
                if not -100 <= b <= 100:
                    raise ValueError(f"logit_bias: bias {b} for token {t} is outside [-100, 100]")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must be a non-empty list of token ids")
            for t in self.allowed_token_ids:
                _token_id("allowed_token_ids", t)
        words = self.bad_words
        if words is not None and (
            not isinstance(words, (list, tuple))
            or not all(isinstance(w, str) and w.strip() for w in words)
        ):
            raise ValueError(f"bad_words must be non-empty strings, got {words!r}")
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise TypeError("cache_salt must be a str")

    @property
    def shapes_logits(self) -> bool:
        """Any of logit_bias, allowed_token_ids, bad_words."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words)

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.frequency_penalty != 0
            or self.presence_penalty != 0
        )


def check_for_model(params: SamplingParams, max_logprobs: int, vocab_size: int) -> None:
    """What a model bounds: at most `max_logprobs` (Config.max_logprobs) logprobs or
    prompt_logprobs; token ids inside the vocabulary. A ValueError naming the field."""
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > max_logprobs:
            raise ValueError(
                f"{name}={k} is more than max_logprobs={max_logprobs} (a Config field)"
            )
    for name, ids in (
        ("logit_bias", params.logit_bias or ()),
        ("allowed_token_ids", params.allowed_token_ids or ()),
        ("stop_token_ids", params.stop_token_ids),
    ):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{name} holds token id {bad[0]}, outside [0, {vocab_size})")


def expand_n(params: SamplingParams) -> list[SamplingParams]:
    """The n single-completion requests of `params` (the i-th seeded with seed + i)."""
    if params.n == 1:
        return [params]
    seed = params.seed
    return [
        dataclasses.replace(params, n=1, seed=None if seed is None else seed + i)
        for i in range(params.n)
    ]


def _token_id(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must hold non-negative int token ids, got {value!r}")


def _check_number(name: str, value: object, kind: type) -> None:
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok:
        raise TypeError(
            f"{name} must be {'a number' if kind is float else 'an int'}, "
            f"got {type(value).__name__}"
        )
    if kind is float and value != value:  # NaN
        raise ValueError(f"{name} must not be NaN")
