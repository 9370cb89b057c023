"""The engine core process behind AsyncLLM: an LLMEngine stepped back to back, driven over a
pipe. It has a GIL of its own, so HTTP, tokenization and streaming in the front end never
delay a step.

Front end -> core: ("add", id, prompt_token_ids, params), ("abort", [ids]), ("shutdown",).
Core -> front end: ("ready", EngineInfo, EngineStats) once; then ("outputs", [OutputDelta],
EngineStats) after each step or command batch, ("error", id, type name, message) for a request
the engine refused, and ("dead", message) if a step raised or a tensor-parallel worker died.
"""

from __future__ import annotations

import logging
import os
import signal
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from nv_engine.config import Config
from nv_engine.outputs import RequestOutput

logger = logging.getLogger(__name__)
_IDLE_POLL_S = 0.5  # when idle: wait this long for a command, then check the workers


class EngineInfo(NamedTuple):
    """What the front end needs to check prompts and requests as the engine would."""

    max_model_len: int  # after the KV cache was sized
    kv_capacity_tokens: int
    vocab_size: int
    max_logprobs: int
    default_sampling: dict[str, Any]  # the model's generation_config.json defaults


class EngineStats(NamedTuple):
    """The scheduler and KV cache as of the message (for /metrics)."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int
    num_preemptions: int


class OutputDelta(NamedTuple):
    """What one step added to one request (the front end keeps the totals)."""

    request_id: int  # the front end's id
    delta_text: str
    delta_token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None
    delta_logprobs: list[dict[int, float]] | None
    cumulative_logprob: float | None
    num_cached_tokens: int
    prompt_logprobs: list[dict[int, float] | None] | None  # in a request's first delta only


def engine_stats(engine: Any) -> EngineStats:
    """The engine's scheduler and KV cache now."""
    scheduler = engine.scheduler
    s = scheduler.block_manager.stats()
    return EngineStats(
        len(scheduler.running),
        len(scheduler.waiting),
        s.num_blocks,
        s.num_free_blocks,
        s.prefix_cache_queries,
        s.prefix_cache_hits,
        scheduler.num_preemptions,
    )


def run_engine_core(config: Config, conn: Connection, parent_pid: int) -> None:
    """The core process's main: build the engine, say ready (or why not), serve commands
    until shutdown, or until the front end is gone."""
    from nv_engine.engine.llm_engine import LLMEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the front end, which stops us
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config)
    except BaseException as e:
        conn.send(("failed", type(e).__name__, str(e)))
        return
    try:
        info = EngineInfo(
            engine.config.max_model_len,
            engine.model_runner.num_blocks * config.kvcache_block_size,
            config.hf_config.vocab_size,
            config.max_logprobs,
            dict(engine.default_sampling),
        )
        conn.send(("ready", info, engine_stats(engine)))
        _Core(engine, conn, parent_pid).run()
    finally:
        engine.close()


class _Core:
    def __init__(self, engine: Any, conn: Connection, parent_pid: int) -> None:
        self.engine = engine
        self.conn = conn
        self.parent_pid = parent_pid
        self.seq_of: dict[int, int] = {}  # front-end id -> engine request id
        self.id_of: dict[int, int] = {}  # engine request id -> front-end id
        self.first: set[int] = set()  # front-end ids yet to send their first delta
        self.pending: list[RequestOutput] = []  # aborted requests' final outputs
        self.stopping = False

    def run(self) -> None:
        engine = self.engine
        while not self.stopping:
            busy = not engine.is_finished()
            try:
                has_command = self.conn.poll(0 if busy else _IDLE_POLL_S)
                if has_command:
                    while True:
                        self._handle(self.conn.recv())
                        if self.stopping or not self.conn.poll(0):
                            break
            except (EOFError, OSError):
                return  # the front end is gone
            if self.stopping:
                return
            try:
                if engine.is_finished():
                    if has_command:
                        self._send_outputs([])
                    elif os.getppid() != self.parent_pid:
                        return
                    else:
                        engine.check_health()
                    continue
                self._send_outputs(engine.step())
            except Exception as e:
                logger.exception("the engine died")
                self.conn.send(("dead", f"{type(e).__name__}: {e}"))
                return

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            _, rid, token_ids, params = message
            try:
                seq_id = self.engine.add_request({"prompt_token_ids": token_ids}, params)
            except (ValueError, TypeError) as e:
                self.conn.send(("error", rid, type(e).__name__, str(e)))
                return
            self.seq_of[rid], self.id_of[seq_id] = seq_id, rid
            self.first.add(rid)
        elif kind == "abort":
            for rid in message[1]:
                seq_id = self.seq_of.get(rid)
                if seq_id is not None:
                    out = self.engine.abort_request(seq_id)
                    if out is not None:
                        self.pending.append(out)
        elif kind == "profile":
            try:
                if message[1] is not None:
                    self.engine.start_profile(message[1])
                else:
                    self.engine.stop_profile()
            except RuntimeError:
                logger.exception("the profiler command failed")
        elif kind == "shutdown":
            self.stopping = True

    def _send_outputs(self, outputs: list[RequestOutput]) -> None:
        deltas = []
        for out in self.pending + outputs:
            rid = self.id_of.get(out.request_id)
            if rid is None:
                continue
            c = out.outputs[0]
            first = rid in self.first
            if first:
                self.first.discard(rid)
            deltas.append(
                OutputDelta(
                    rid,
                    c.delta_text,
                    c.delta_token_ids,
                    c.finish_reason,
                    c.stop_reason,
                    c.delta_logprobs,
                    c.cumulative_logprob,
                    out.num_cached_tokens,
                    out.prompt_logprobs if first else None,
                )
            )
            if out.finished:
                del self.id_of[out.request_id], self.seq_of[rid]
        self.pending.clear()
        self.conn.send(("outputs", deltas, engine_stats(self.engine)))
