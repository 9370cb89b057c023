"""The completions and chat completions endpoints over an AsyncLLM: whole responses or
OpenAI's SSE chunks, logprobs in OpenAI's two formats, usage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from nv_engine.engine.async_llm import AsyncLLM
from nv_engine.entrypoints.openai.protocol import (
    ParsedRequest,
    RequestError,
    chat_messages,
    completion_prompts,
    field_of,
    parse_chat,
    parse_completion,
    with_room,
)
from nv_engine.outputs import CompletionOutput, RequestOutput
from nv_engine.sampling_params import check_for_model


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _ChunkLines:
    """The SSE lines of one streamed response's chunks, `sse({**head, "choices": [choice]})`
    byte for byte, with the head (id, object, created, model) serialised once per response
    rather than once per token."""

    def __init__(self, head: dict[str, Any]) -> None:
        self._open = f'data: {json.dumps(head)[:-1]}, "choices": ['

    def __call__(self, choice: dict[str, Any]) -> str:
        return f"{self._open}{json.dumps(choice)}]}}\n\n"


@dataclass(slots=True)
class _Choice:
    """One choice of the response, as the streams left it."""

    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None


async def _merge(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several generate() streams as they come. Closing this
    closes every stream (which aborts its request)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    """Builds OpenAI's responses for the engine. Each handler checks the body (RequestError,
    a 400 naming the field), tokenizes on the engine's tokenizer pool, checks the length,
    then returns a response dict, or an async iterator of SSE lines when `stream` is true."""

    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.max_logprobs = engine.config.max_logprobs
        self._token_text: dict[int, str] = {}

    # ---- completions -----------------------------------------------------------------------------

    async def completions(self, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[str]:
        defaults = self.engine.default_sampling
        parsed = parse_completion(body, defaults, self.max_logprobs)
        self._check_for_model(parsed, body)
        prompts = completion_prompts(body)
        token_ids = [await self._encode(p, "prompt") for p in prompts]
        each = [with_room(parsed, len(t), self.max_model_len, "prompt") for t in token_ids]
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = [
            self.engine.generate({"prompt_token_ids": t}, p.params, f"{rid}-{i}")
            for i, (t, p) in enumerate(zip(token_ids, each, strict=True))
        ]
        n = parsed.params.n
        usage_prompt = sum(map(len, token_ids))
        echoed = [""] * len(prompts)
        if parsed.echo:  # the prompt as given, or its ids' text
            echoed = [
                p if isinstance(p, str) else await self.engine.detokenize(t)
                for p, t in zip(prompts, token_ids, strict=True)
            ]
        if parsed.stream:
            return await self._started(
                self._completion_chunks(rid, streams, n, parsed, usage_prompt, echoed)
            )
        choices = await self._collect(streams, n, len(prompts))
        return {
            **self._head(rid, "text_completion"),
            "choices": [
                {
                    "index": i,
                    "text": echoed[i // n] + c.text,
                    "logprobs": self._completion_logprobs(c.logprobs, 0)
                    if parsed.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage(usage_prompt, choices),
        }

    async def _completion_chunks(
        self,
        rid: str,
        streams: list[AsyncIterator[RequestOutput]],
        n: int,
        parsed: ParsedRequest,
        usage_prompt: int,
        echoed: list[str],
    ) -> AsyncIterator[str]:
        head = self._head(rid, "text_completion")
        line = _ChunkLines(head)
        offsets = [0] * (n * len(streams))
        counts = [0] * (n * len(streams))
        async for i, out in _outputs(streams):
            if out is None:  # the engine has started: the echoed prompts come first
                for index in range(n * len(streams)) if parsed.echo else ():
                    choice = {"index": index, "text": echoed[index // n], "logprobs": None,
                              "finish_reason": None, "stop_reason": None}  # fmt: skip
                    yield line(choice)
                continue
            for c in out.outputs:
                index = i * n + c.index
                counts[index] = c.num_tokens
                if not (c.delta_text or c.delta_token_ids or c.finished):
                    continue  # (tokens whose text is held back still get a chunk, as vLLM's)
                logprobs = None
                if parsed.logprobs is not None:
                    logprobs = self._completion_logprobs(
                        c.delta_logprobs, offsets[index], c.delta_token_ids
                    )
                offsets[index] += len(c.delta_text)
                choice = {
                    "index": index,
                    "text": c.delta_text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason if c.finished else None,
                }
                yield line(choice)
        if parsed.include_usage:
            yield sse({**head, "choices": [], "usage": _usage_counts(usage_prompt, counts)})
        yield sse("[DONE]")

    # ---- chat ------------------------------------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[str]:
        parsed = parse_chat(body, self.engine.default_sampling, self.max_logprobs)
        self._check_for_model(parsed, body)
        messages = chat_messages(body)
        add_generation_prompt = body.get("add_generation_prompt")
        try:
            token_ids = await self.engine.encode_chat(
                messages,
                True if add_generation_prompt is None else add_generation_prompt,
                body.get("chat_template_kwargs"),
                bool(body.get("continue_final_message")),
            )
            token_ids = await self._encode({"prompt_token_ids": token_ids}, "messages")
        except (ValueError, TypeError) as e:
            raise RequestError(str(e), "messages") from None
        parsed = with_room(parsed, len(token_ids), self.max_model_len, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self.engine.generate({"prompt_token_ids": token_ids}, parsed.params, rid)
        if parsed.stream:
            return await self._started(self._chat_chunks(rid, stream, parsed, len(token_ids)))
        choices = await self._collect([stream], parsed.params.n, 1)
        return {
            **self._head(rid, "chat.completion"),
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c.logprobs, parsed.logprobs)
                    if parsed.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage(len(token_ids), choices),
        }

    async def _chat_chunks(
        self,
        rid: str,
        stream: AsyncIterator[RequestOutput],
        parsed: ParsedRequest,
        usage_prompt: int,
    ) -> AsyncIterator[str]:
        head = self._head(rid, "chat.completion.chunk")
        line = _ChunkLines(head)
        n = parsed.params.n
        counts = [0] * n
        async for _, out in _outputs([stream]):
            if out is None:  # the engine has started: OpenAI's streams open with the role
                for i in range(n):
                    choice = {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield line(choice)
                continue
            for c in out.outputs:
                counts[c.index] = c.num_tokens
                want_logprobs = parsed.logprobs is not None and c.delta_token_ids
                if not (c.delta_text or c.finished or want_logprobs):
                    continue
                choice = {
                    "index": c.index,
                    "delta": {"content": c.delta_text} if c.delta_text else {},
                    "logprobs": self._chat_logprobs(c.delta_logprobs, parsed.logprobs)
                    if parsed.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason if c.finished else None,
                }
                yield line(choice)
        if parsed.include_usage:
            yield sse({**head, "choices": [], "usage": _usage_counts(usage_prompt, counts)})
        yield sse("[DONE]")

    # ---- tokenizer endpoints ---------------------------------------------------------------------

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        allowed = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                   "chat_template_kwargs"}  # fmt: skip
        for key in body:
            if key not in allowed:
                raise RequestError(f"Unrecognized request argument supplied: {key}", key)
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer", None)
        if ("prompt" in body) == ("messages" in body):
            raise RequestError("give one of prompt and messages", "prompt")
        if "prompt" in body:
            if not isinstance(body["prompt"], str):
                raise RequestError("prompt must be a string", "prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise RequestError("add_special_tokens must be a boolean", "add_special_tokens")
            tokens = await self.engine.tokenize(body["prompt"], special)
        else:
            add = body.get("add_generation_prompt", True)
            try:
                tokens = await self.engine.encode_chat(
                    chat_messages(body), add, body.get("chat_template_kwargs")
                )
            except (ValueError, TypeError) as e:
                raise RequestError(str(e), "messages") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len}

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        for key in body:
            if key not in ("model", "tokens"):
                raise RequestError(f"Unrecognized request argument supplied: {key}", key)
        tokens = body.get("tokens")
        vocab = self.engine.info.vocab_size
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
        ):
            raise RequestError(f"tokens must be a list of token ids in [0, {vocab})", "tokens")
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer", None)
        return {"prompt": await self.engine.detokenize(tokens)}

    # ---- helpers ---------------------------------------------------------------------------------

    def _check_for_model(self, parsed: ParsedRequest, body: dict[str, Any]) -> None:
        try:
            check_for_model(parsed.params, self.max_logprobs, self.engine.info.vocab_size)
        except ValueError as e:
            raise RequestError(str(e), field_of(str(e), body)) from None

    def _head(self, rid: str, kind: str) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name}

    async def _encode(self, prompt: Any, param: str) -> list[int]:
        try:
            return await self.engine.encode(prompt)
        except (ValueError, TypeError) as e:
            raise RequestError(str(e), param) from None

    @staticmethod
    async def _started(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """Wait for the stream's first chunk (it comes once the engine produced something),
        so that an error before any token (a dead engine, a refused request) is still an HTTP
        status, not a 200. An error later ends the stream with an error event."""
        try:
            first = await anext(chunks)
        except BaseException:
            await chunks.aclose()
            raise

        async def rest() -> AsyncIterator[str]:
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
            except Exception as e:
                status = getattr(e, "status", 500)
                error = RequestError(f"{type(e).__name__}: {e}", None, status, "server_error")
                yield sse(error.body())
                yield sse("[DONE]")
            finally:
                await chunks.aclose()

        return rest()

    async def _collect(
        self, streams: list[AsyncIterator[RequestOutput]], n: int, num_prompts: int
    ) -> list[_Choice]:
        choices = [_Choice() for _ in range(n * num_prompts)]
        async for i, out in _merge(streams):
            for c in out.outputs:
                _update(choices[i * n + c.index], c)
        return choices

    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _completion_logprobs(
        self,
        entries: list[dict[int, float]] | None,
        offset: int,
        token_ids: list[int] | None = None,
    ) -> dict[str, Any]:
        """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.
        Each entry's first key is its token (see TokenLogprobs.entry)."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        for entry in entries or []:
            token_id = next(iter(entry))
            text = self._token(token_id)
            tokens.append(text)
            token_logprobs.append(entry[token_id])
            top.append({self._token(t): lp for t, lp in entry.items()})
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def _chat_logprobs(self, entries: list[dict[int, float]] | None, k: int) -> dict[str, Any]:
        """OpenAI's chat logprobs: content[] with token, logprob, bytes and the top k."""

        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = []
        for entry in entries or []:
            token_id = next(iter(entry))
            best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            content.append(
                {**item(token_id, entry[token_id]), "top_logprobs": [item(*kv) for kv in best]}
            )
        return {"content": content}


async def _outputs(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput | None]]:
    """_merge's outputs, after a first (0, None) once the first one is in: a stream's
    generator yields nothing before the engine has accepted its request."""
    async with contextlib.aclosing(_merge(streams)) as merged:
        first = await anext(merged, None)
        yield 0, None
        if first is not None:
            yield first
            async for item in merged:
                yield item


def _update(choice: _Choice, c: CompletionOutput) -> None:
    choice.text = c.text
    choice.num_tokens = c.num_tokens
    choice.finish_reason = c.finish_reason
    choice.stop_reason = c.stop_reason
    choice.logprobs = c.logprobs


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict[str, int]:
    return _usage_counts(prompt_tokens, [c.num_tokens for c in choices])


def _usage_counts(prompt_tokens: int, counts: list[int]) -> dict[str, int]:
    completion = sum(counts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
