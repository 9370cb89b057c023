"""The server's cost per streamed chunk in its SSE generators (CPU): one request's 1,024
outputs of one token each, from a stream that is already complete, through the completions
and chat chunk generators (building each chunk's JSON line). HTTP and the engine are left out.

    python benchmarks/sse_chunks.py
"""

from __future__ import annotations

import asyncio
import time

from nv_engine import SamplingParams
from nv_engine.entrypoints.openai.protocol import ParsedRequest
from nv_engine.entrypoints.openai.serving import OpenAIServing
from nv_engine.outputs import CompletionOutput, RequestOutput

N = 1024


def outputs() -> list[RequestOutput]:
    tokens: list[int] = []  # the request's history, which the outputs view
    outs = []
    for i in range(N):
        tokens.append(1000 + i)
        last = i == N - 1
        c = CompletionOutput(
            0, "w" * (i + 1), " w", [1000 + i], "length" if last else None,
            _tokens=tokens, _start=0, _end=i + 1,
        )  # fmt: skip
        outs.append(RequestOutput("r", [1, 2, 3], [c], last))
    return outs


async def _stream(outs: list[RequestOutput]):
    for o in outs:
        yield o


async def us_per_chunk(kind: str, outs: list[RequestOutput]) -> float:
    serving = object.__new__(OpenAIServing)  # the generators need only the model's name
    serving.model_name = "m"
    parsed = ParsedRequest(SamplingParams(max_tokens=N), None, True, False, None)
    if kind == "completions":
        chunks = serving._completion_chunks("cmpl-x", [_stream(outs)], 1, parsed, 3, [""])
    else:
        chunks = serving._chat_chunks("chatcmpl-x", _stream(outs), parsed, 3)
    n, t = 0, time.perf_counter()
    async for _ in chunks:
        n += 1
    return (time.perf_counter() - t) / n * 1e6


async def main() -> None:
    outs = outputs()
    for kind in ("completions", "chat"):
        best = min([await us_per_chunk(kind, outs) for _ in range(30)])
        print(f"{kind}: {best:.2f} µs per chunk (best of 30 streams of {N} tokens)")


if __name__ == "__main__":
    asyncio.run(main())
