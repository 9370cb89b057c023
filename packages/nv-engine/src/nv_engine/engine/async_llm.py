"""`AsyncLLM`: the engine behind an asyncio API (vLLM's shape), its core in its own process."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nv_engine.config import Config
from nv_engine.engine.engine_core import EngineInfo, EngineStats, OutputDelta, run_engine_core
from nv_engine.engine.inputs import Prompt, chat_prompt_ids, check_prompt_length, prompt_token_ids
from nv_engine.engine.model_files import load_tokenizer
from nv_engine.outputs import CompletionOutput, RequestOutput
from nv_engine.sampling_params import SamplingParams, check_for_model, expand_n

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more: a step raised, a tensor-parallel worker or the engine
    core process died, or it was shut down. The message names the cause."""


@dataclass(slots=True)
class RequestTimes:
    """When a request arrived, got its first token and its latest (time.monotonic())."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None


@dataclass(slots=True)
class _Completion:
    """One completion's totals, built from the core's deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None


@dataclass(eq=False, slots=True)
class _Stream:
    """One `generate()` call: its n engine requests and the queue its outputs arrive on."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list[int]
    times: RequestTimes
    ids: list[int] = field(default_factory=list)  # the core's requests, one per completion
    num_finished: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None


class AsyncLLM:
    """`async for out in llm.generate(prompt, params, request_id)` yields a `RequestOutput`
    after every engine step that advanced the request (its `outputs` hold the completions that
    step advanced, each with its delta and its totals so far); the last has `finished` set. A
    reader slower than the engine gets the outputs that queued up merged into one.

    The engine (scheduler, model runner, output stage) runs in a process of its own, stepping
    back to back while there is work: HTTP, tokenization and streaming here never hold its
    GIL. Prompts are tokenized on a thread pool, off the event loop. Requests from every
    coroutine batch together. As with tensor parallelism, a script that makes an AsyncLLM
    needs `if __name__ == "__main__":` (the core process is spawned).

    Leaving the `async for` early (a `break`, or the task cancelled because the client went
    away) aborts the request: the core frees its KV blocks before its next step. If a step
    raises, a tensor-parallel worker or the core process dies, every open stream and every
    later call raises `EngineDeadError`, and `is_healthy()` is False. `shutdown()` stops the
    core and frees the GPU.
    """

    def __init__(self, model: str | Path | Config, **kwargs: Any) -> None:
        self.config = config = Config.of(model, **kwargs)
        self.tokenizer = load_tokenizer(config)
        # each called as f(output, times, num_new_tokens) on the event loop, for every output
        # before it is yielded (the server's metrics are one)
        self.stat_loggers: list[Callable[[RequestOutput, RequestTimes, int], None]] = []
        self._streams: dict[str, _Stream] = {}  # open streams, by request id
        self._completions: dict[int, tuple[_Stream, _Completion]] = {}  # by the core's id
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._tokenize_pool = ThreadPoolExecutor(4, thread_name_prefix="nv-tokenize")
        self._dead: EngineDeadError | None = None
        self._stopping = False
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=run_engine_core, args=(config, child, os.getpid()), name="nv-engine-core"
        )
        self._proc.start()
        child.close()
        # the core's settings, and its stats as of its latest message (the first: ready)
        self.info, self.stats = self._wait_ready()
        self._receiver = threading.Thread(target=self._receive, name="nv-outputs", daemon=True)
        self._receiver.start()
        # a script that forgets shutdown() must not wait at exit for the core it started
        # (weakref.finalize also runs at interpreter exit, before multiprocessing joins it)
        self._finalizer = weakref.finalize(self, _stop_core, self._conn, self._proc)

    @classmethod
    def from_config(cls, config: Config) -> AsyncLLM:
        return cls(config)

    def _wait_ready(self) -> tuple[EngineInfo, EngineStats]:
        try:
            message = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(
                f"the engine core process exited while starting (exit code {self._proc.exitcode})"
            ) from None
        if message[0] == "ready":
            return message[1], message[2]
        self._proc.join()
        _, kind, text = message
        if kind in ("ValueError", "TypeError"):  # a bad setting: the same error as LLM gives
            raise (ValueError if kind == "ValueError" else TypeError)(text)
        raise RuntimeError(f"the engine failed to start: {kind}: {text}")

    # ---- the API ---------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def default_sampling(self) -> dict[str, Any]:
        """The model's generation_config.json sampling defaults, as SamplingParams keywords."""
        return self.info.default_sampling

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.info.default_sampling)

    def is_healthy(self) -> bool:
        return self._dead is None

    async def check_health(self) -> None:
        """vLLM's: raise the EngineDeadError once the engine is dead or shut down."""
        self._raise_if_dead()

    @property
    def is_running(self) -> bool:
        """vLLM's: serving (neither dead nor shut down)."""
        return self._dead is None and not self._stopping

    @property
    def errored(self) -> bool:
        """vLLM's: the engine died (dead_error says why)."""
        return self._dead is not None

    async def get_tokenizer(self) -> Any:
        """vLLM's: the model's tokenizer (the front end's copy), or None without one."""
        return self.tokenizer

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Why the engine stopped (None while it is healthy)."""
        return self._dead

    async def encode(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids, checked as `LLM.generate` checks them (on the tokenizer pool)."""
        return await self._in_pool(self._encode, prompt)

    def _encode(self, prompt: Prompt) -> list[int]:
        ids = prompt_token_ids(prompt, self.tokenizer, self.info.vocab_size, "prompt")
        check_prompt_length(len(ids), self.info.max_model_len, self.info.kv_capacity_tokens)
        return ids

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> list[int]:
        """A conversation rendered with the chat template, as token ids (on the tokenizer pool)."""
        render = functools.partial(
            chat_prompt_ids, self.tokenizer, continue_final_message=continue_final_message
        )
        return await self._in_pool(render, messages, add_generation_prompt, chat_template_kwargs)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids for `text`, unchecked (on the tokenizer pool)."""
        encode = functools.partial(self.tokenizer.encode, add_special_tokens=add_special_tokens)
        return await self._in_pool(encode, text)

    async def detokenize(self, token_ids: list[int]) -> str:
        return await self._in_pool(self.tokenizer.decode, token_ids)

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def generate(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs (see the class docstring). `prompt` is anything
        `LLM.generate` takes; `sampling_params.n` completions run as one request."""
        self._raise_if_dead()
        arrival = time.monotonic()
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        elif not isinstance(sampling_params, SamplingParams):
            kind = type(sampling_params).__name__
            raise TypeError(f"sampling_params must be SamplingParams, got {kind}")
        check_for_model(sampling_params, self.info.max_logprobs, self.info.vocab_size)
        request_id = uuid.uuid4().hex if request_id is None else str(request_id)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        token_ids = await self.encode(prompt)
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop, asyncio.Queue(), token_ids, RequestTimes(arrival))
        self._streams[request_id] = stream
        finished = False
        try:
            for i, params in enumerate(expand_n(sampling_params)):
                rid = next(self._ids)
                stream.ids.append(rid)
                self._completions[rid] = (stream, _Completion(i, logprobs=None))
                self._send(("add", rid, token_ids, params))
            while not finished:
                item = await stream.queue.get()
                while not isinstance(item, BaseException) and not stream.queue.empty():
                    nxt = stream.queue.get_nowait()  # a reader behind: one merged output
                    item = nxt if isinstance(nxt, BaseException) else _coalesce(item, nxt)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            del self._streams[request_id]
            for rid in stream.ids:
                self._completions.pop(rid, None)
            if not finished and self._dead is None and not self._stopping:
                self._send(("abort", stream.ids))

    async def abort(self, request_id: str) -> None:
        """End a running request: its stream ends with finish_reason "abort". Unknown ids are
        ignored."""
        stream = self._streams.get(str(request_id))
        if stream is not None:
            self._send(("abort", stream.ids))

    def abort_all(self) -> None:
        """End every running request (each stream ends with finish_reason "abort")."""
        for stream in list(self._streams.values()):
            self._send(("abort", stream.ids))

    def start_profile(self, directory: str) -> None:
        """`LLMEngine.start_profile(directory)` in the core process, between two steps (a
        failure, such as a profiler already running, is logged there)."""
        self._raise_if_dead()
        self._send(("profile", directory))

    def stop_profile(self) -> None:
        """`LLMEngine.stop_profile()` in the core process: every rank writes its trace."""
        self._raise_if_dead()
        self._send(("profile", None))

    def shutdown(self) -> None:
        """Stop the core process (open streams get EngineDeadError) and free the GPU.
        Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._finalizer()
        self._receiver.join(10)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._stopping:
            raise EngineDeadError("the engine was shut down")

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            self._raise_if_dead()
            raise EngineDeadError("the engine core process is gone") from None

    # ---- outputs, on the receiver thread ---------------------------------------------------------

    def _receive(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                if self._stopping:
                    self._die(EngineDeadError("the engine was shut down"), log=False)
                else:
                    code = self._proc.exitcode
                    self._die(EngineDeadError(f"the engine core process exited (code {code})"))
                return
            kind = message[0]
            if kind == "outputs":
                self.stats = message[2]
                self._deliver(message[1])
            elif kind == "error":
                _, rid, error_kind, text = message
                entry = self._completions.get(rid)
                if entry is not None:
                    error = TypeError(text) if error_kind == "TypeError" else ValueError(text)
                    self._send_all([(entry[0], error)])
            elif kind == "dead":
                self._die(EngineDeadError(f"the engine died: {message[1]}"))

    def _die(self, error: EngineDeadError, log: bool = True) -> None:
        if self._dead is None and log:
            logger.error("%s", error)
        self._dead = self._dead or error
        streams = {stream for stream, _ in self._completions.values()}
        self._send_all([(stream, self._dead) for stream in streams])

    def _deliver(self, deltas: list[OutputDelta]) -> None:
        """One RequestOutput per stream, holding its completions that advanced."""
        per_stream: dict[_Stream, list[CompletionOutput]] = {}
        for d in deltas:
            entry = self._completions.get(d.request_id)
            if entry is None:
                continue  # its stream is gone
            stream, c = entry
            c.text += d.delta_text
            c.token_ids += d.delta_token_ids
            if d.delta_logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = []
                c.logprobs += d.delta_logprobs
            if d.prompt_logprobs is not None:
                stream.prompt_logprobs = d.prompt_logprobs
            stream.num_cached_tokens = max(stream.num_cached_tokens, d.num_cached_tokens)
            if d.finish_reason is not None:
                stream.num_finished += 1
            per_stream.setdefault(stream, []).append(
                CompletionOutput(
                    index=c.index,
                    text=c.text,
                    delta_text=d.delta_text,
                    delta_token_ids=d.delta_token_ids,
                    finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason,
                    delta_logprobs=d.delta_logprobs,
                    cumulative_logprob=d.cumulative_logprob,
                    _tokens=c.token_ids,
                    _end=len(c.token_ids),
                    _logprobs=c.logprobs,
                    _num_logprobs=0 if c.logprobs is None else len(c.logprobs),
                )
            )
        self._send_all(
            [
                (
                    stream,
                    RequestOutput(
                        request_id=stream.request_id,
                        prompt_token_ids=stream.prompt_token_ids,
                        outputs=completions,
                        finished=stream.num_finished == len(stream.ids),
                        num_cached_tokens=stream.num_cached_tokens,
                        prompt_logprobs=stream.prompt_logprobs,
                    ),
                )
                for stream, completions in per_stream.items()
            ]
        )

    def _send_all(self, items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        """One wake-up of each event loop per message, not one per stream."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._put_all, batch)
            except RuntimeError:
                pass  # that event loop is closed: nobody is listening

    def _put_all(self, batch: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        """On the streams' event loop."""
        now = time.monotonic()
        for stream, item in batch:
            if isinstance(item, RequestOutput):
                num_new = sum(len(c.delta_token_ids) for c in item.outputs)
                times = stream.times
                for log in self.stat_loggers:
                    log(item, times, num_new)
                if num_new:
                    if times.first_token is None:
                        times.first_token = now
                    times.last_token = now
            stream.queue.put_nowait(item)


def _stop_core(conn: Any, proc: Any) -> None:
    """Ask the core to shut down (it frees the engine and its workers), then make sure."""
    try:
        conn.send(("shutdown",))
    except (OSError, ValueError):
        pass
    proc.join(30)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    conn.close()


def _coalesce(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """`new` with the deltas of `old` (an earlier output not yet read) before its own: a
    reader slower than the engine gets one output per wake-up, not one per step."""
    merged = {c.index: c for c in old.outputs}
    for c in new.outputs:
        prev = merged.get(c.index)
        if prev is not None:
            c.delta_text = prev.delta_text + c.delta_text
            c.delta_token_ids = prev.delta_token_ids + c.delta_token_ids
            if c.delta_logprobs is not None:
                c.delta_logprobs = prev.delta_logprobs + c.delta_logprobs
        merged[c.index] = c
    new.outputs = sorted(merged.values(), key=lambda c: c.index)
    return new
