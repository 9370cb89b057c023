"""The OpenAI-compatible HTTP server (`nv-engine serve`): FastAPI routes over an AsyncLLM,
run by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from nv_engine.engine.async_llm import AsyncLLM, EngineDeadError
from nv_engine.entrypoints.openai.metrics import ServerMetrics
from nv_engine.entrypoints.openai.protocol import RequestError
from nv_engine.entrypoints.openai.serving import OpenAIServing
from nv_engine.worker.profiler import PROFILER_DIR_ENV

logger = logging.getLogger("nv_engine.entrypoints.openai")

_PARSE_OFF_LOOP_BYTES = 1 << 20  # bodies larger than this are parsed on a worker thread


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What `nv-engine serve` sets besides the engine."""

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (printed)
    api_key: str | None = None  # required on /v1/* when set
    max_request_body_bytes: int = 32 << 20  # a larger body is a 413
    exit_on_engine_death: bool = True  # exit(1) once the engine is dead, for a supervisor
    engine_death_grace_s: float = 2.0  # answering 503s before that exit
    shutdown_timeout_s: float = 5.0  # on SIGTERM/SIGINT, in-flight requests get this long


def _version() -> str:
    try:
        return version("nv-engine")
    except PackageNotFoundError:
        return "unknown"


def _error(status: int, message: str, param: str | None = None, kind: str | None = None):
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(RequestError(message, param, status, kind).body(), status_code=status)


class _Guard:
    """ASGI middleware: 401 on /v1/* without the API key (when one is set); 413 for a body
    over the limit, by its Content-Length or as it arrives."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                response = _error(401, "Invalid or missing API key", None, "authentication_error")
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise RequestError(f"request body over {self.max_body_bytes} bytes", None, 413)
            return message

        await self.app(scope, counted, send)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        response = _error(413, f"request body over {self.max_body_bytes} bytes")
        await response(scope, receive, send)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        if len(raw) > _PARSE_OFF_LOOP_BYTES:
            body = await asyncio.to_thread(json.loads, raw or b"{}")
        else:
            body = json.loads(raw or b"{}")
    except ValueError as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`, cancelled if the client goes away first (which aborts its engine requests);
    None then."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


def build_app(engine: AsyncLLM, config: ServerConfig) -> FastAPI:
    """The FastAPI app: /health, /version, /metrics, /v1/models[/{id}], /v1/completions,
    /v1/chat/completions, /tokenize, /detokenize. Errors follow OpenAI's schema."""
    app = FastAPI(title="nv", version=_version(), docs_url=None, redoc_url=None)
    serving = OpenAIServing(engine, config.model_name)
    metrics = ServerMetrics(engine, config.model_name)
    engine.stat_loggers.append(metrics.record)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(exc.status_code, message)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(503, str(exc), None, "service_unavailable")

    def check_alive() -> None:
        if not engine.is_healthy():
            raise engine.dead_error

    def check_model(body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != config.model_name:
            raise RequestError(
                f"The model `{model}` does not exist.", "model", 404, "NotFoundError",
                "model_not_found",
            )  # fmt: skip

    @app.get("/health")
    @app.api_route("/ping", methods=["GET", "POST"])  # vLLM's (SageMaker's) name for it
    async def health() -> Response:
        check_alive()
        return Response(status_code=200)

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": _version()}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {
            "id": config.model_name,
            "object": "model",
            "created": created,
            "owned_by": "nv",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        """OpenAI's retrieve (a served name may be a path, slashes and all)."""
        check_model({"model": model_id})
        return model_card()

    async def generation(request: Request, handler: Callable) -> Response:
        check_alive()
        body = await _json_body(request)
        check_model(body)
        if body.get("stream") is True:
            chunks: AsyncIterator[str] = await handler(body)
            return StreamingResponse(chunks, media_type="text/event-stream")
        result = await _unless_disconnected(request, handler(body))
        if result is None:  # the client went away
            return Response(status_code=499)
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, serving.completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, serving.chat)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        check_model(body)
        return await serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        check_model(body)
        return await serving.detokenize(body)

    profiler_dir = os.environ.get(PROFILER_DIR_ENV)
    if profiler_dir:  # as vLLM: the routes exist only when it is set

        @app.post("/start_profile")
        async def start_profile() -> Response:
            engine.start_profile(profiler_dir)
            return Response(status_code=200)

        @app.post("/stop_profile")
        async def stop_profile() -> Response:
            engine.stop_profile()
            return Response(status_code=200)

    app.add_middleware(_Guard, api_key=config.api_key, max_body_bytes=config.max_request_body_bytes)
    return app


def _event_loop_and_parser() -> tuple[str, str]:
    """uvicorn's event loop and HTTP parser: uvloop and httptools, nv-engine's dependencies (as
    in vLLM's server; they cut streaming latency, docs/benchmarks.md), or asyncio and h11 where
    they are not installed (uvloop has no Windows build)."""
    return _importable("uvloop", "asyncio"), _importable("httptools", "h11")


def _importable(module: str, otherwise: str) -> str:
    """`module` if it imports (not merely found: a broken install must not stop the server)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return otherwise
    return module


class _Server(uvicorn.Server):
    """uvicorn, but on SIGTERM/SIGINT every in-flight request is ended first (streams finish
    with finish_reason "abort" and `[DONE]`, rather than being cut when the graceful shutdown
    times out), and the process exits with status 0 after the shutdown (uvicorn re-raises the
    signal once shut down, which a supervisor reads as a crash)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self.loop: asyncio.AbstractEventLoop | None = None  # set at startup

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None:  # (a signal handler: the work goes to the event loop)
            self.loop.call_soon_threadsafe(self._on_exit)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(engine: AsyncLLM, config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT (exit 0: in-flight requests get shutdown_timeout_s, then the
    engine is freed) or, with exit_on_engine_death, until the engine dies (exit 1, after
    engine_death_grace_s of 503s). Prints the address it listens on."""
    app = build_app(engine, config)
    exit_code = 0

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(watch()) if config.exit_on_engine_death else None
        yield
        if watcher is not None:
            watcher.cancel()

    async def watch() -> None:
        nonlocal exit_code
        while engine.is_healthy():
            await asyncio.sleep(0.2)
        logger.error("%s; exiting in %.1f s", engine.dead_error, config.engine_death_grace_s)
        await asyncio.sleep(config.engine_death_grace_s)
        exit_code = 1
        server.should_exit = True

    app.router.lifespan_context = lifespan
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.create_server((config.host, config.port), family=family)
    host, port = sock.getsockname()[:2]
    loop, http = _event_loop_and_parser()
    uv_config = uvicorn.Config(
        app,
        loop=loop,
        http=http,
        log_level="info",
        timeout_graceful_shutdown=config.shutdown_timeout_s,
        lifespan="on",
    )
    server = _Server(uv_config, on_exit=engine.abort_all)
    print(
        f"[nv] serving {config.model_name} at http://{host}:{port}/v1 ({loop}, {http})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.shutdown()
    return exit_code
