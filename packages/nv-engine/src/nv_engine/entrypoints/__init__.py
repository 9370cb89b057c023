"""How users reach the engine: the LLM class, the `nv-engine` CLI, the benchmark workloads, the
demo model, and the OpenAI-compatible server (openai/)."""
