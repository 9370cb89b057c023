from __future__ import annotations

from nv_engine.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """The public entry point, as in vLLM and Nano-vLLM:

    llm = LLM("/path/to/model", tensor_parallel_size=1, ...)
    outputs = llm.generate(prompts, SamplingParams(...))
    """
