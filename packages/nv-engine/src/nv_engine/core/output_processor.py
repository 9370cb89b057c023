"""The output stage: every stop decision, and the RequestOutputs a step produces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nv_engine.core.detokenizer import IncrementalDetokenizer
from nv_engine.core.sequence import Sequence
from nv_engine.outputs import CompletionOutput, RequestOutput


@dataclass(slots=True)
class _RequestState:
    """What the output stage keeps of one request: its text and how much of it, of its tokens
    and of its logprobs was given out. The tokens themselves stay on the Sequence."""

    seq: Sequence
    prompt_token_ids: list[int]  # one copy, shared by every output
    stream: bool  # an output every step (else only the final one)
    detokenizer: IncrementalDetokenizer | None  # None: the text is decoded once, at the end
    hold: int  # trailing characters withheld from a delta: they may start a stop string
    text: str = ""
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    num_sent_logprobs: int = 0
    stop_floor: int = 0  # a stop string must end past this many characters (min_tokens)
    stop_reason: str | int | None = None


class OutputProcessor:
    """Decides, once per sampled token, whether its request stops, in this order (vLLM's):
    not before `min_tokens`; EOS (unless `ignore_eos`); a stop token id; a stop string in the
    text (found incrementally: only the new text and the stop strings' length before it are
    searched; it wins over the length limit on the same token, as in vLLM); `max_tokens` or
    the model's length. A request that stops is ended in the
    scheduler through `finish(seq, reason)`.

    Streaming requests are detokenized incrementally and get an output every step; the others
    get one output when they finish (and are detokenized incrementally only if they have stop
    strings, else decoded once then).
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_token_ids: set[int],
        max_model_len: int,
        finish: Callable[[Sequence, str], None],
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._finish = finish
        self._states: dict[int, _RequestState] = {}

    def add(self, seq: Sequence, stream: bool) -> None:
        p = seq.params
        incremental = self.tokenizer is not None and (stream or bool(p.stop))
        detokenizer = (
            IncrementalDetokenizer(
                self.tokenizer, seq.token_ids[: seq.num_prompt_tokens], p.skip_special_tokens
            )
            if incremental
            else None
        )
        hold = max(map(len, p.stop)) - 1 if p.stop and not p.include_stop_str_in_output else 0
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        self._states[seq.seq_id] = _RequestState(seq, prompt, stream, detokenizer, hold)

    def has_unfinished(self) -> bool:
        return bool(self._states)

    def process(self, sampled: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """Each (sequence, its newly sampled token) of one step: stop decisions, then the
        outputs due (streaming requests, and every request that finished)."""
        outputs = []
        for seq, token in sampled:
            state = self._states.get(seq.seq_id)
            if state is None:
                continue
            reason = self._token_stop(state, token)
            if state.detokenizer is not None:
                delta = state.detokenizer.step([token])
                state.text += delta
                if seq.num_sampled_tokens < seq.params.min_tokens:
                    state.stop_floor = len(state.text)
                elif reason in (None, "length") and delta and seq.params.stop:
                    reason = self._stop_string(state, len(delta)) or reason
            if reason is not None:
                self._finish(seq, reason)
                outputs.append(self._final(state, reason))
            elif state.stream:
                outputs.append(self._output(state, None))
        return outputs

    def abort(self, seq: Sequence) -> RequestOutput | None:
        """Forget an aborted request; its final output (finish_reason "abort") if it streams."""
        state = self._states.get(seq.seq_id)
        if state is None:
            return None
        output = self._final(state, "abort")
        return output if state.stream else None

    # ---- stop decisions ------------------------------------------------------------------------

    def _token_stop(self, state: _RequestState, token: int) -> str | None:
        seq, p = state.seq, state.seq.params
        num_out = seq.num_sampled_tokens
        if num_out < p.min_tokens:
            return None
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            state.stop_reason = token
            return "stop"
        if num_out >= p.max_tokens or seq.num_prompt_tokens + num_out >= self.max_model_len:
            return "length"
        return None

    def _stop_string(self, state: _RequestState, delta_len: int) -> str | None:
        """Find a stop string that ends in the last `delta_len` characters of the text (and past
        the text of the first min_tokens - 1 tokens); cut the text there."""
        p = state.seq.params
        text = state.text
        new_from = len(text) - delta_len
        best: tuple[int, str] | None = None
        for s in p.stop:
            i = text.find(s, max(0, new_from - len(s) + 1, state.stop_floor - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        state.text = text[: i + len(s)] if p.include_stop_str_in_output else text[:i]
        state.stop_reason = s
        return "stop"

    # ---- outputs -------------------------------------------------------------------------------

    def _final(self, state: _RequestState, reason: str) -> RequestOutput:
        del self._states[state.seq.seq_id]
        p = state.seq.params
        if state.detokenizer is None:
            if self.tokenizer is not None:
                state.text = self.tokenizer.decode(
                    state.seq.output_token_ids, skip_special_tokens=p.skip_special_tokens
                )
        elif not isinstance(state.stop_reason, str):  # no stop string cut the text
            state.text += state.detokenizer.flush()
        return self._output(state, reason)

    def _output(self, state: _RequestState, reason: str | None) -> RequestOutput:
        seq = state.seq
        end = len(state.text) if reason is not None else len(state.text) - state.hold
        end = max(end, state.num_sent_chars)
        delta_text = state.text[state.num_sent_chars : end]
        state.num_sent_chars = end
        start = seq.num_prompt_tokens
        num_tokens = seq.num_sampled_tokens
        delta_token_ids = seq.token_ids[start + state.num_sent_tokens : start + num_tokens]
        state.num_sent_tokens = num_tokens
        delta_logprobs = None
        num_logprobs = 0
        if seq.logprobs is not None:
            num_logprobs = len(seq.logprobs)
            delta_logprobs = seq.logprobs[state.num_sent_logprobs : num_logprobs]
            state.num_sent_logprobs = num_logprobs
        completion = CompletionOutput(
            index=0,
            text=state.text[:end],
            delta_text=delta_text,
            delta_token_ids=delta_token_ids,
            finish_reason=reason,
            stop_reason=state.stop_reason if reason == "stop" else None,
            delta_logprobs=delta_logprobs,
            cumulative_logprob=None if seq.logprobs is None else seq.cumulative_logprob,
            _tokens=seq.token_ids,
            _start=start,
            _end=start + num_tokens,
            _logprobs=seq.logprobs,
            _num_logprobs=num_logprobs,
        )
        return RequestOutput(
            request_id=seq.seq_id,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[completion],
            finished=reason is not None,
            num_cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=seq.prompt_logprobs,
        )
