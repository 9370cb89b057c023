"""nv: a small, fast LLM inference engine."""

from nv_engine.config import Config
from nv_engine.llm import LLM
from nv_engine.sampling_params import SamplingParams

__all__ = ["LLM", "Config", "SamplingParams"]
