"""nv: a small, fast LLM inference engine."""

from nv_engine.config import Config
from nv_engine.engine.async_llm import AsyncLLM, EngineDeadError
from nv_engine.entrypoints.llm import LLM
from nv_engine.outputs import CompletionOutput, RequestOutput
from nv_engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "Config",
    "EngineDeadError",
    "RequestOutput",
    "SamplingParams",
]
