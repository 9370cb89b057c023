"""What the engine gives back per request (vLLM's `RequestOutput` / `CompletionOutput` names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a request, as of the step that produced this output.

    `text` and `token_ids` are everything so far; `delta_text` and `delta_token_ids` what this
    step added (a streaming client concatenates the deltas: their sum is `text`). `text` stops
    short of the last characters while they may still turn out to be a stop string, or while
    their UTF-8 bytes are incomplete; the final output holds it all.

    `token_ids` and `logprobs` are read, when asked for, from the request's own history (which
    only grows), as it was at this step: an output costs O(new tokens), not O(all tokens).
    """

    index: int
    text: str
    delta_text: str
    delta_token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort"
    # what stopped it: the stop string or stop token id (None for EOS, length or abort)
    stop_reason: str | int | None = None
    delta_logprobs: list[dict[int, float]] | None = None  # per new token, when asked for
    cumulative_logprob: float | None = None
    # the history these outputs are views of: tokens[start:end], logprobs[:num_logprobs]
    _tokens: list[int] = field(default_factory=list, repr=False)
    _start: int = 0
    _end: int = 0
    _logprobs: list[dict[int, float]] | None = field(default=None, repr=False)
    _num_logprobs: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self._tokens[self._start : self._end]

    @property
    def num_tokens(self) -> int:
        """len(token_ids), without copying them (a stream asks at every step)."""
        return self._end - self._start

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        """Per output token so far, {token id: logprob} (the token first), when asked for."""
        return None if self._logprobs is None else self._logprobs[: self._num_logprobs]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """A request's state after one engine step: its prompt and its completions. `finished` once
    every completion has a finish_reason."""

    request_id: Any
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    # the first completion's fields, for the common n=1 case
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def delta_text(self) -> str:
        return self.outputs[0].delta_text

    @property
    def delta_token_ids(self) -> list[int]:
        return self.outputs[0].delta_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    def __getitem__(self, key: str) -> Any:
        """`output["text"]` etc.: the fields of `to_dict()`, for code written against
        `LLMEngine.step()` when it returned those dicts."""
        return self.to_dict()[key]

    def to_dict(self) -> Result:
        """Nano-vLLM's result dict (what `LLM.generate` returns): the first completion's
        `text`, `token_ids`, `finish_reason`, `logprobs`, `cumulative_logprob`; the prompt's
        fields; and `outputs`, every completion as such a dict. Its keys read as attributes
        too (`Result`), so vLLM's `out.outputs[0].text` works on it as well."""
        completions = [
            Result(
                index=c.index,
                text=c.text,
                token_ids=c.token_ids,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                logprobs=c.logprobs,
                cumulative_logprob=c.cumulative_logprob,
            )
            for c in self.outputs
        ]
        first = {k: v for k, v in completions[0].items() if k != "index"}
        return Result(
            request_id=self.request_id,
            **first,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=self.prompt_logprobs,
            finished=self.finished,
            outputs=completions,
        )


class Result(dict):
    """A dict whose keys also read as attributes: `LLM.generate`'s results serve code written
    for Nano-vLLM (`out["text"]`) and for vLLM (`out.outputs[0].text`, `out.prompt_token_ids`)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"result has no field {name!r}") from None
