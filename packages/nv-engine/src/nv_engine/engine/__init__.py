"""The engines: LLMEngine (in-process, step by step), AsyncLLM (asyncio front end) and the
engine-core process it drives; prompt processing and what is read from a model directory."""
