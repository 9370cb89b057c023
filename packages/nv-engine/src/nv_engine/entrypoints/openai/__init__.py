"""The OpenAI-compatible HTTP server: `build_app` (FastAPI) and `run_server` (uvicorn)."""

from nv_engine.entrypoints.openai.app import ServerConfig, build_app, run_server

__all__ = ["ServerConfig", "build_app", "run_server"]
