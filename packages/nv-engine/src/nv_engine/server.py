"""An OpenAI-compatible HTTP server (`nv-engine serve`): GET /v1/models and /health, POST
/v1/completions and /v1/chat/completions (whole responses; no streaming, no logprobs).

One thread owns the engine and steps it (`EngineLoop`); the HTTP server's request threads hand
it work and wait for the results, so requests from many clients are batched together. Bad
requests get HTTP 400 with the engine's error message, which names the field.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from nv_engine.llm_engine import LLMEngine
from nv_engine.sampling_params import SamplingParams, expand_n

# request fields passed to SamplingParams as they are (OpenAI's names, and vLLM's extensions)
_SAMPLING_FIELDS = (
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
)

AddRequests = Callable[[LLMEngine], list[int]]


@dataclass
class _Group:
    """Requests submitted together; `future` gets their outputs, in submission order."""

    future: Future
    ids: list[int]
    outputs: dict[int, dict[str, Any]] = field(default_factory=dict)


class EngineLoop:
    """Steps `engine` on its own thread. `submit(add)` runs `add(engine)` on that thread (it
    queues requests and returns their ids) and returns a Future of their outputs; an error in
    `add` (a bad prompt or parameter) becomes the Future's exception, queueing nothing. If a
    step fails, the engine is done: every waiting and later submission gets that error."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[tuple[AddRequests, Future]] = queue.Queue()
        self._groups: dict[int, _Group] = {}  # by request id
        self._stop = threading.Event()
        self.error: Exception | None = None  # what stopped the engine
        self._thread = threading.Thread(target=self._run, name="nv-engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def submit(self, add: AddRequests) -> Future:
        future: Future = Future()
        self._inbox.put((add, future))
        if self.error is not None:  # (after the put: the loop may be draining the inbox)
            self._fail_inbox(self.error)
        return future

    def _run(self) -> None:
        device = self.engine.model_runner.device
        if device.type == "cuda":  # a new thread's current device is cuda:0 (Triton uses it)
            torch.cuda.set_device(device)
        while not self._stop.is_set():
            self._take_submissions(wait=self.engine.is_finished())
            if self.engine.is_finished():
                continue
            try:
                done = self.engine.step()
            except Exception as e:  # the engine cannot go on
                self.error = e
                for group in {id(g): g for g in self._groups.values()}.values():
                    group.future.set_exception(e)
                self._groups.clear()
                self._fail_inbox(e)
                return
            for out in done:
                group = self._groups.pop(out["request_id"], None)
                if group is None:
                    continue
                group.outputs[out["request_id"]] = out
                if len(group.outputs) == len(group.ids):
                    group.future.set_result([group.outputs[i] for i in group.ids])

    def _fail_inbox(self, error: Exception) -> None:
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not future.done():
                future.set_exception(error)

    def _take_submissions(self, wait: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            add, future = item
            try:
                ids = add(self.engine)
            except Exception as e:
                future.set_exception(e)
            else:
                group = _Group(future, ids)
                self._groups.update((i, group) for i in ids)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return


def sampling_params(body: dict[str, Any], defaults: dict[str, Any]) -> SamplingParams:
    """SamplingParams from a request body, over the engine's defaults (its model's generation
    config). `max_completion_tokens` is the chat API's newer name for max_tokens."""
    if body.get("stream"):
        raise ValueError("stream: streaming responses are not supported")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ValueError("logprobs: not supported by this server (use the Python API)")
    kw = dict(defaults)
    if body.get("max_completion_tokens") is not None:
        kw["max_tokens"] = body["max_completion_tokens"]
    kw.update((k, body[k]) for k in _SAMPLING_FIELDS if body.get(k) is not None)
    return SamplingParams(**kw)


def _prompts(body: dict[str, Any]) -> list[Any]:
    """The completions API's prompt: text, token ids, or a list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
    ):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return prompt
    raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of them")


def _usage(prompt_tokens: int, outputs: list[dict[str, Any]]) -> dict[str, int]:
    completion = sum(len(o["token_ids"]) for o in outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


class OpenAIServer(ThreadingHTTPServer):
    """The HTTP server; `serve_forever()` serves until `shutdown()`. `loop` must be started."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], loop: EngineLoop, model_name: str) -> None:
        super().__init__(address, _Handler)
        self.loop = loop
        self.model_name = model_name

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        params = sampling_params(body, {"max_tokens": 16, **self.loop.engine.default_sampling})
        prompts = _prompts(body)

        def add(engine: LLMEngine) -> list[int]:
            token_ids = [engine.prompt_token_ids(p, i) for i, p in enumerate(prompts)]
            return [
                engine.add_request(ids, child) for ids in token_ids for child in expand_n(params)
            ]

        outputs = self.loop.submit(add).result()
        choices = [
            {"index": i, "text": o["text"], "logprobs": None, "finish_reason": o["finish_reason"]}
            for i, o in enumerate(outputs)
        ]
        prompt_tokens = sum(len(o["prompt_token_ids"]) for o in outputs[:: params.n])
        return self._response("cmpl", "text_completion", choices, _usage(prompt_tokens, outputs))

    def chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        engine = self.loop.engine
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        has_max = body.get("max_tokens") is not None or body.get("max_completion_tokens")
        params = sampling_params(body, engine.default_sampling)
        kwargs = body.get("chat_template_kwargs") or {}

        def add(engine: LLMEngine) -> list[int]:
            ids = engine.chat_prompt_ids(messages, True, kwargs)  # add_request validates them
            p = params
            if not has_max:  # as vLLM: up to the model's length
                room = max(1, engine.config.max_model_len - len(ids))
                p = dataclasses.replace(params, max_tokens=room, min_tokens=min(p.min_tokens, room))
            return [engine.add_request(ids, child) for child in expand_n(p)]

        outputs = self.loop.submit(add).result()
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": o["text"]},
                "logprobs": None,
                "finish_reason": o["finish_reason"],
            }
            for i, o in enumerate(outputs)
        ]
        usage = _usage(len(outputs[0]["prompt_token_ids"]), outputs)
        return self._response("chatcmpl", "chat.completion", choices, usage)

    def _response(
        self, prefix: str, kind: str, choices: list[dict[str, Any]], usage: dict[str, int]
    ) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": usage,
        }


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "owned_by": "nv"}
            self._send(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        routes = {
            "/v1/completions": self.server.completions,
            "/v1/chat/completions": self.server.chat_completions,
        }
        route = routes.get(self.path)
        if route is None:
            self._error(404, f"no route {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            self._send(200, route(body))
        except (ValueError, TypeError) as e:  # bad JSON, prompt or parameter
            self._error(400, str(e))
        except Exception as e:
            self._error(500, f"{type(e).__name__}: {e}")

    def _error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "internal_error"
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per request on stderr
