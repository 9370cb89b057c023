"""OpenAI's request bodies, checked field by field: every field nv implements becomes a
SamplingParams keyword or a request option; any other field is a 400 naming it (never silently
dropped)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nv_engine.sampling_params import SamplingParams


class RequestError(Exception):
    """A request the server refuses, in OpenAI's error schema: `param` names the field."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = (
            message,
            param,
            status,
            type,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# passed to SamplingParams as they are (OpenAI's names, and vLLM's extensions)
SAMPLING_FIELDS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "n",
        "max_tokens",
        "min_tokens",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "ignore_eos",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "allowed_token_ids",
        "bad_words",
    }
)
_COMMON = SAMPLING_FIELDS | {"model", "stream", "stream_options", "user"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of", "logit_bias"}
# (logit_bias: OpenAI's, with token ids as JSON object keys)
CHAT_FIELDS = _COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "logit_bias",
    "echo",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the serving code needs of a request body, checked."""

    params: SamplingParams
    max_tokens_field: str | None  # the field that gave max_tokens; None: a default
    stream: bool
    include_usage: bool
    logprobs: int | None  # top logprobs per token, None: none asked
    echo: bool = False  # completions: the prompt's text before the completion's


def _fields(body: dict[str, Any], allowed: frozenset[str] | set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise RequestError(f"Unrecognized request argument supplied: {key}", key)


def _unsupported(body: dict[str, Any], key: str, ok: Any, what: str) -> None:
    """A field nv accepts only at its no-op value(s)."""
    value = body.get(key)
    if value is not None and value not in ok:
        raise RequestError(f"{key}: {what} is not supported by this server", key)


def _typed(body: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """body[key] (None if absent or null), which must be of `kind` (a bool is no int here)."""
    value = body.get(key)
    if value is not None and (
        not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)
    ):
        raise RequestError(f"{key} must be {what}, got {type(value).__name__}", key)
    return value


def check_common(body: dict[str, Any], allowed: frozenset[str] | set[str]) -> None:
    _fields(body, allowed)
    _typed(body, "model", str, "a string")
    _typed(body, "stream", bool, "a boolean")
    _typed(body, "user", str, "a string")
    options = _typed(body, "stream_options", dict, "an object")
    if options is not None:
        if not body.get("stream"):
            raise RequestError(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        for key in options:
            if key not in ("include_usage", "continuous_usage_stats"):
                raise RequestError(
                    f"Unrecognized request argument supplied: stream_options.{key}",
                    "stream_options",
                )
        if not isinstance(options.get("include_usage", False), bool):
            raise RequestError("stream_options.include_usage must be a boolean", "stream_options")
        if options.get("continuous_usage_stats"):
            raise RequestError(
                "stream_options.continuous_usage_stats is not supported", "stream_options"
            )


def parse_completion(body: dict[str, Any], defaults: dict[str, Any], max_logprobs: int):
    check_common(body, COMPLETION_FIELDS)
    echo = bool(_typed(body, "echo", bool, "a boolean"))
    if echo and body.get("logprobs") is not None:
        raise RequestError("echo with logprobs (the prompt's logprobs) is not supported", "echo")
    _unsupported(body, "suffix", ("",), "suffix")
    best_of = _typed(body, "best_of", int, "an integer")
    if best_of is not None and best_of != body.get("n", 1):
        raise RequestError("best_of: only best_of == n is supported", "best_of")
    logprobs = _typed(body, "logprobs", int, "an integer")
    _check_logprobs("logprobs", logprobs, max_logprobs)
    parsed = _parsed(body, {"max_tokens": 16, **defaults}, "max_tokens", logprobs)
    return dataclasses.replace(parsed, echo=echo)


def parse_chat(body: dict[str, Any], defaults: dict[str, Any], max_logprobs: int):
    check_common(body, CHAT_FIELDS)
    _unsupported(body, "echo", (False,), "echo")
    _unsupported(body, "tools", ([],), "tool calling")
    _unsupported(body, "tool_choice", ("none",), "tool calling")
    _typed(body, "parallel_tool_calls", bool, "a boolean")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(
            "response_format: only {'type': 'text'} is supported (no JSON mode or schemas)",
            "response_format",
        )
    _typed(body, "add_generation_prompt", bool, "a boolean")
    if _typed(body, "continue_final_message", bool, "a boolean") and (
        body.get("add_generation_prompt") is not False  # (vLLM's default: true)
    ):
        raise RequestError(
            "continue_final_message needs add_generation_prompt set to false",
            "continue_final_message",
        )
    _typed(body, "chat_template_kwargs", dict, "an object")
    want = _typed(body, "logprobs", bool, "a boolean")
    top = _typed(body, "top_logprobs", int, "an integer")
    if top is not None and not want:
        raise RequestError("top_logprobs needs logprobs to be true", "top_logprobs")
    logprobs = (top or 0) if want else None
    _check_logprobs("top_logprobs", logprobs, max_logprobs)
    field = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    if field == "max_completion_tokens" and body.get("max_tokens") is not None:
        raise RequestError("give one of max_tokens and max_completion_tokens", field)
    return _parsed(body, defaults, field, logprobs)


def _check_logprobs(name: str, k: int | None, limit: int) -> None:
    if k is not None and not 0 <= k <= limit:
        raise RequestError(f"{name} must be in [0, {limit}], got {k}", name)


def _parsed(
    body: dict[str, Any], defaults: dict[str, Any], max_tokens_field: str, logprobs: int | None
) -> ParsedRequest:
    kw = dict(defaults)
    kw.update((k, body[k]) for k in SAMPLING_FIELDS if body.get(k) is not None)
    given = body.get(max_tokens_field) is not None
    if given:
        kw["max_tokens"] = body[max_tokens_field]
    kw["logprobs"] = logprobs
    if body.get("logit_bias"):
        kw["logit_bias"] = _logit_bias(body["logit_bias"])
    try:
        params = SamplingParams(**kw)
    except (TypeError, ValueError) as e:
        raise RequestError(str(e), field_of(str(e), body)) from None
    return ParsedRequest(
        params=params,
        max_tokens_field=max_tokens_field if given else None,
        stream=bool(body.get("stream")),
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        logprobs=logprobs,
    )


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias}, the ids as strings (JSON object keys)."""
    if not isinstance(value, dict):
        raise RequestError("logit_bias must be an object of {token id: bias}", "logit_bias")
    try:
        return {int(k): v for k, v in value.items()}
    except ValueError:
        raise RequestError("logit_bias keys must be token ids", "logit_bias") from None


def field_of(message: str, body: dict[str, Any]) -> str | None:
    """The request field a SamplingParams error names (its messages start with the field)."""
    name = message.split(" ", 1)[0].rstrip(":").split("=")[0]
    if name == "max_tokens" and "max_completion_tokens" in body:
        return "max_completion_tokens"
    return name if name in SAMPLING_FIELDS | {"logit_bias"} else None


def with_room(
    parsed: ParsedRequest, num_prompt_tokens: int, max_model_len: int, where: str
) -> ParsedRequest:
    """Check the prompt and max_tokens against the model's length (vLLM's 400). Without a
    max_tokens, chat completions may fill the room left (vLLM's); completions take their
    default (16, or the generation config's), capped by that room."""
    room = max_model_len - num_prompt_tokens
    p = parsed.params
    if parsed.max_tokens_field is not None:
        if p.max_tokens <= room:
            return parsed
        param = parsed.max_tokens_field
    elif room >= 1:
        max_tokens = room if where == "messages" else min(p.max_tokens, room)
        if max_tokens == p.max_tokens:
            return parsed
        p = dataclasses.replace(p, max_tokens=max_tokens, min_tokens=min(p.min_tokens, max_tokens))
        return dataclasses.replace(parsed, params=p)
    else:
        param = where
    raise RequestError(
        f"This model's maximum context length is {max_model_len} tokens. However, you "
        f"requested {num_prompt_tokens + p.max_tokens} tokens ({num_prompt_tokens} in the "
        f"{where}, {p.max_tokens} in the completion). Please reduce the length of the {where} "
        "or completion.",
        param,
    )


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's messages (the engine checks each one when it renders the template)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool"):
            raise RequestError(f"messages[{i}]: tool messages are not supported", "messages")
    return messages


def completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """The completions API's prompt: text, token ids, or a non-empty list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(
            isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p))
            for p in prompt
        ):
            return prompt
    raise RequestError(
        "prompt must be a string, a list of token ids, or a non-empty list of either", "prompt"
    )
