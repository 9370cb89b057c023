"""`AsyncLLM`: the engine behind an asyncio API (vLLM's shape), stepped on its own thread."""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nv_engine.config import Config
from nv_engine.llm_engine import LLMEngine, Prompt
from nv_engine.outputs import CompletionOutput, RequestOutput
from nv_engine.sampling_params import SamplingParams, expand_n

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more: a step raised, a tensor-parallel worker died, or it
    was shut down. The message names the cause."""


@dataclass(slots=True)
class RequestTimes:
    """When a request arrived, got its first token and its latest (time.monotonic())."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None


@dataclass(eq=False, slots=True)
class _Stream:
    """One `generate()` call: its n engine requests and the queue its outputs arrive on."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list[int]
    times: RequestTimes
    seq_ids: list[int] = field(default_factory=list)
    num_finished: int = 0


class AsyncLLM:
    """`async for out in llm.generate(prompt, params, request_id)` yields a `RequestOutput`
    after every engine step that advanced the request (its `outputs` hold the completions that
    step advanced, each with its delta and its text so far); the last has `finished` set.

    One thread owns the `LLMEngine` and runs its steps back to back while there is work, so
    the GPU never waits for the event loop; prompts are tokenized on a thread pool, neither
    on the event loop nor on the engine's thread. Requests from every coroutine batch together.

    Leaving the `async for` early (a `break`, or the task cancelled because the client went
    away) aborts the request: the engine thread frees its KV blocks before its next step.
    If a step raises or a tensor-parallel worker dies, every open stream and every later call
    raises `EngineDeadError`, and `is_healthy()` is False. `shutdown()` stops the thread and
    frees the engine.
    """

    def __init__(self, model: str | Path | Config, **kwargs: Any) -> None:
        self.engine = LLMEngine(model, **kwargs)
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        # each called as f(output, times, num_new_tokens) on the event loop, for every output
        # before it is yielded (the server's metrics are one)
        self.stat_loggers: list[Callable[[RequestOutput, RequestTimes, int], None]] = []
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # open streams, by request id (event loop side)
        self._seqs: dict[int, tuple[_Stream, int]] = {}  # engine thread: seq id -> (stream, i)
        self._tokenize_pool = ThreadPoolExecutor(4, thread_name_prefix="nv-tokenize")
        self._dead: EngineDeadError | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nv-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: Config, **kwargs: Any) -> AsyncLLM:
        return cls(config, **kwargs)

    # ---- the API ---------------------------------------------------------------------------------

    def is_healthy(self) -> bool:
        return self._dead is None

    @property
    def dead_error(self) -> EngineDeadError | None:
        """Why the engine stopped (None while it is healthy)."""
        return self._dead

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.get_default_sampling_params()

    async def encode(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids, validated as `LLM.generate` does (on the tokenizer pool)."""
        return await self._in_pool(self.engine.prompt_token_ids, prompt)

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """A conversation rendered with the chat template, as token ids (on the tokenizer pool)."""
        return await self._in_pool(
            self.engine.chat_prompt_ids, messages, add_generation_prompt, chat_template_kwargs
        )

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
        params = self.engine.checked_params(sampling_params)
        request_id = str(uuid.uuid4().hex) if request_id is None else str(request_id)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        token_ids = await self.encode(prompt)
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop, asyncio.Queue(), token_ids, RequestTimes(arrival))
        self._streams[request_id] = stream
        finished = False
        try:
            self._commands.put(("add", (stream, expand_n(params))))
            self._raise_if_dead()  # (after the put: the dead engine thread fails it anyway)
            while not finished:
                item = await stream.queue.get()
                while not isinstance(item, BaseException) and not stream.queue.empty():
                    nxt = stream.queue.get_nowait()  # a consumer behind: one merged output
                    item = nxt if isinstance(nxt, BaseException) else _coalesce(item, nxt)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            del self._streams[request_id]
            if not finished and self._dead is None:
                self._commands.put(("abort", stream))

    async def abort(self, request_id: str) -> None:
        """End a running request: its stream ends with finish_reason "abort". Unknown ids are
        ignored."""
        stream = self._streams.get(str(request_id))
        if stream is not None:
            self._commands.put(("abort", stream))

    def shutdown(self) -> None:
        """Stop the engine thread (open streams get EngineDeadError) and free the engine.
        Idempotent."""
        if not self._stopping:
            self._stopping = True
            self._commands.put(("wake", None))
            self._thread.join()
            self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
            self.engine.close()

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._stopping:
            raise EngineDeadError("the engine was shut down")

    # ---- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        device = self.engine.model_runner.device
        if device.type == "cuda":  # a new thread's current device is cuda:0 (Triton uses it)
            torch.cuda.set_device(device)
        try:
            while not self._stopping:
                self._take_commands(wait=self.engine.is_finished())
                if not self.engine.is_finished():
                    self._deliver(self.engine.step())
        except Exception as e:
            logger.exception("the engine died")
            self._dead = EngineDeadError(f"the engine died: {type(e).__name__}: {e}")
            self._dead.__cause__ = e
        error = self._dead or EngineDeadError("the engine was shut down")
        self._send_all([(stream, error) for stream in {s for s, _ in self._seqs.values()}])
        self._seqs.clear()
        while not self._stopping:  # dead: fail what still arrives, until shutdown()
            self._fail_commands(error)
        self._fail_commands(error, wait=False)

    def _take_commands(self, wait: bool) -> None:
        """Run queued adds and aborts; when idle, wait a while for one, and check meanwhile
        that every tensor-parallel worker is alive."""
        try:
            command = self._commands.get(timeout=0.5) if wait else self._commands.get_nowait()
        except queue.Empty:
            if wait:
                self.engine.check_health()
            return
        while True:
            kind, arg = command
            if kind == "add":
                self._add(*arg)
            elif kind == "abort":
                self._abort(arg)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, stream: _Stream, children: list[SamplingParams]) -> None:
        try:
            for i, params in enumerate(children):
                prompt = {"prompt_token_ids": stream.prompt_token_ids}
                seq_id = self.engine.add_request(prompt, params)
                stream.seq_ids.append(seq_id)
                self._seqs[seq_id] = (stream, i)
        except Exception as e:  # (validated before: a prompt the scheduler cannot take)
            self._abort(stream, notify=False)
            self._send_all([(stream, e)])

    def _abort(self, stream: _Stream, notify: bool = True) -> None:
        completions = []
        for seq_id in stream.seq_ids:
            entry = self._seqs.pop(seq_id, None)
            if entry is not None:
                out = self.engine.abort_request(seq_id)
                if out is not None:
                    out.outputs[0].index = entry[1]
                    completions += out.outputs
        if notify and completions:
            final = RequestOutput(stream.request_id, stream.prompt_token_ids, completions, True)
            self._send_all([(stream, final)])

    def _fail_commands(self, error: EngineDeadError, wait: bool = True) -> None:
        try:
            command = self._commands.get(timeout=0.5) if wait else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if command[0] == "add":
                self._send_all([(command[1][0], error)])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one RequestOutput per stream, holding the
        completions of its engine requests that advanced."""
        per_stream: dict[_Stream, tuple[RequestOutput, list[CompletionOutput]]] = {}
        for out in outputs:
            entry = self._seqs.get(out.request_id)
            if entry is None:
                continue
            stream, index = entry
            completion = out.outputs[0]
            completion.index = index
            per_stream.setdefault(stream, (out, []))[1].append(completion)
            if out.finished:
                del self._seqs[out.request_id]
                stream.num_finished += 1
        self._send_all(
            [
                (
                    stream,
                    RequestOutput(
                        request_id=stream.request_id,
                        prompt_token_ids=stream.prompt_token_ids,
                        outputs=completions,
                        finished=stream.num_finished == len(stream.seq_ids),
                        num_cached_tokens=first.num_cached_tokens,
                        prompt_logprobs=first.prompt_logprobs,
                    ),
                )
                for stream, (first, completions) in per_stream.items()
            ]
        )

    def _send_all(self, items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        """One wake-up of each event loop per step, not one per stream."""
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


def _coalesce(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """`new` with the deltas of `old` (an earlier step's output not yet consumed) before its
    own: a consumer slower than the engine gets one output per wake-up, not one per step."""
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
