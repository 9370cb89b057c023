"""The OpenAI-compatible server, in this process on a free port, through the `openai` client
and httpx: the HTTP contract, against the Python API's results."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from nv_engine import LLM, AsyncLLM, SamplingParams
from nv_engine.engine.inputs import chat_prompt_ids
from nv_engine.entrypoints.openai import ServerConfig, build_app

ENGINE = dict(device="cpu", kvcache_block_size=16, num_kvcache_blocks=128)
CHAT = [{"role": "user", "content": "Hi there"}]
NAME = "demo"


class _Served:
    """A uvicorn server on a thread, on a socket bound to a free port."""

    def __init__(self, engine: AsyncLLM, config: ServerConfig) -> None:
        sock = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = build_app(engine, config)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model_dir(demo_model_dir):
    return demo_model_dir


@pytest.fixture(scope="module")
def expected(model_dir):
    """What the Python API gives."""
    with LLM(str(model_dir), **ENGINE) as llm:
        greedy = SamplingParams(temperature=0, max_tokens=8)
        return {
            "completion": llm.generate(["Hello"], greedy, use_tqdm=False)[0],
            "completion_lp": llm.generate(
                ["Hello"], SamplingParams(temperature=0, max_tokens=5, logprobs=2), use_tqdm=False
            )[0],
            "chat": llm.chat(CHAT, greedy, use_tqdm=False)[0],
            "seeded": llm.generate(
                ["Hello"],
                SamplingParams(temperature=1.0, max_tokens=6, seed=3, n=2, ignore_eos=True),
                use_tqdm=False,
            )[0],
        }


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = AsyncLLM(str(model_dir), **ENGINE)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def base(engine, expected):
    served = _Served(engine, ServerConfig(NAME, max_request_body_bytes=1 << 20))
    yield served.base
    served.close()
    _wait_for(lambda: engine.stats.num_free_blocks == engine.stats.num_blocks)  # all came back


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def _error(response: httpx.Response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return error["message"]


# ---- the basics -------------------------------------------------------------------------------


def test_health_version_models(base, client):
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/ping").status_code == httpx.post(base + "/ping").status_code == 200
    assert isinstance(httpx.get(base + "/version").json()["version"], str)
    models = httpx.get(base + "/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == NAME and card["object"] == "model" and card["owned_by"] == "nv"
    assert isinstance(card["created"], int)
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME  # OpenAI's GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    _error(httpx.get(base + "/v1/models/some/path"), 404, "model")  # names may hold slashes


def test_completion_equals_the_python_api(client, expected):
    ref = expected["completion"]
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == NAME
    assert r.choices[0].text == ref["text"]
    assert r.choices[0].finish_reason == ref["finish_reason"]
    n_prompt = len(ref["prompt_token_ids"])
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == len(ref["token_ids"])
    assert r.usage.total_tokens == n_prompt + len(ref["token_ids"])
    # token ids as the prompt give the same
    ids = client.completions.create(
        model=NAME, prompt=ref["prompt_token_ids"], max_tokens=8, temperature=0
    )
    assert ids.choices[0].text == ref["text"]


def test_chat_equals_the_python_api_and_parts_equal_strings(client, expected):
    ref = expected["chat"]
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref["text"]
    assert r.usage.prompt_tokens == len(ref["prompt_token_ids"])
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    r2 = client.chat.completions.create(model=NAME, messages=parts, max_tokens=8, temperature=0)
    assert r2.choices[0].message.content == ref["text"]


def test_seed_and_n(client, expected):
    ref = expected["seeded"]
    r = client.completions.create(
        model=NAME,
        prompt="Hello",
        max_tokens=6,
        temperature=1.0,
        seed=3,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [o["text"] for o in ref["outputs"]]
    assert r.usage.completion_tokens == 12


def test_stop_and_vllm_extras(client):
    base = client.completions.create(
        model=NAME, prompt="Hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    stop = text[3:5]
    r = client.completions.create(
        model=NAME,
        prompt="Hello",
        max_tokens=8,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.0, "repetition_penalty": 1.0},
    )
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logit_bias_allowed_tokens_and_bad_words(base, client):
    kw = dict(model=NAME, prompt="Hello", max_tokens=6, temperature=0)
    token = 70  # a printable character of the demo tokenizer

    def ids(text: str) -> list[int]:
        body = {"prompt": text, "add_special_tokens": False}
        return httpx.post(base + "/tokenize", json=body).json()["tokens"]

    biased = client.completions.create(logit_bias={str(token): 100}, **kw)
    assert ids(biased.choices[0].text) == [token] * 6
    allowed = client.completions.create(extra_body={"allowed_token_ids": [token + 1]}, **kw)
    assert ids(allowed.choices[0].text) == [token + 1] * 6
    plain = client.completions.create(**kw).choices[0].text
    banned = client.completions.create(extra_body={"bad_words": [plain[:2]]}, **kw)
    assert plain[:2] not in banned.choices[0].text


def test_echo(client):
    kw = dict(model=NAME, max_tokens=5, temperature=0)
    plain = client.completions.create(prompt=["Hello", "Bye"], **kw)
    echoed = client.completions.create(prompt=["Hello", "Bye"], echo=True, **kw)
    assert [c.text for c in echoed.choices] == [
        "Hello" + plain.choices[0].text,
        "Bye" + plain.choices[1].text,
    ]
    chunks = list(client.completions.create(prompt="Hello", echo=True, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens


# ---- streaming --------------------------------------------------------------------------------


def test_streamed_completion_equals_whole(client):
    kw = dict(model=NAME, prompt="Once upon", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_streamed_chat_starts_with_the_role_and_ends_with_usage(client):
    kw = dict(model=NAME, messages=CHAT, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == whole.choices[0].message.content
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sse_wire_format(base):
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        json.loads(e[len("data: ") :])


@pytest.mark.parametrize(
    "choice",
    [
        {"index": 0, "text": "héllo \"wörld\"\n", "logprobs": None, "finish_reason": None},
        {"index": 3, "delta": {}, "logprobs": {"content": [{"token": "\\", "logprob": -0.5}]},
         "finish_reason": "stop", "stop_reason": 7},
    ],
)  # fmt: skip
def test_a_chunk_line_is_the_whole_chunk_serialised(choice):
    """The streamed chunks serialise their head once per response: each line must still be
    exactly the chunk's own JSON."""
    from nv_engine.entrypoints.openai.serving import _ChunkLines, sse

    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m/ü"}
    assert _ChunkLines(head)(choice) == sse({**head, "choices": [choice]})


def test_streamed_n_has_every_index(client):
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=CHAT, max_tokens=4, temperature=1.0, seed=1, n=3, stream=True
        )
    )
    finished = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    roles = {c.choices[0].index for c in chunks if c.choices[0].delta.role}
    assert finished == roles == {0, 1, 2}


def test_64_concurrent_streaming_clients(base, client):
    prompts = [f"Client {i} says" for i in range(64)]
    whole = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0)
    expected = {c.index: c.text for c in whole.choices}
    aclient = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> str:
        stream = await aclient.completions.create(
            model=NAME, prompt=prompts[i], max_tokens=6, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    texts = asyncio.run(main())
    assert texts == [expected[i] for i in range(64)]


# ---- logprobs ---------------------------------------------------------------------------------


def test_completion_logprobs(client, expected):
    ref = expected["completion_lp"]
    r = client.completions.create(
        model=NAME, prompt="Hello", max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for got, entry, token in zip(lp.token_logprobs, ref["logprobs"], ref["token_ids"], strict=True):
        assert got == pytest.approx(entry[token], abs=1e-5)
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert "".join(lp.tokens) == r.choices[0].text
    streamed = list(
        client.completions.create(
            model=NAME, prompt="Hello", max_tokens=5, temperature=0, logprobs=2, stream=True
        )
    )
    tokens = [t for c in streamed for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_continue_final_message(base, client):
    # vLLM's extra field: the last (assistant) message left open for the model to go on with
    messages = CHAT + [{"role": "assistant", "content": "Well"}]
    body = dict(model=NAME, messages=messages, max_tokens=4, temperature=0)
    open_turn = {"continue_final_message": True, "add_generation_prompt": False}
    r = client.chat.completions.create(**body, extra_body=open_turn)
    closed = client.chat.completions.create(**body)
    assert r.usage.prompt_tokens < closed.usage.prompt_tokens  # no end of turn, no new turn
    bad = httpx.post(base + "/v1/chat/completions", json={**body, "continue_final_message": True})
    _error(bad, 400, "continue_final_message")  # add_generation_prompt left true


def test_chat_logprobs(client):
    kw = dict(model=NAME, messages=CHAT, max_tokens=5, temperature=0, logprobs=True)
    r = client.chat.completions.create(top_logprobs=3, **kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy
    streamed = list(client.chat.completions.create(top_logprobs=3, stream=True, **kw))
    tokens = [
        i.token for c in streamed if c.choices[0].logprobs for i in c.choices[0].logprobs.content
    ]
    assert tokens == [i.token for i in content]


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logit_bias": {"100000": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
        ({"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
        ({"prompt": "x", "bad_words": [""]}, "bad_words"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
        ({"prompt": "x", "logprobs": 10**3}, "logprobs"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": [1, 10**7]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x" * 5000}, "prompt"),
    ],
)
def test_bad_completion_requests(base, body, param):
    _error(httpx.post(base + "/v1/completions", json={"model": NAME, **body}), 400, param)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
    ],
)
def test_bad_chat_requests(base, body, param):
    request = {"model": NAME, "messages": CHAT, **body}
    _error(httpx.post(base + "/v1/chat/completions", json=request), 400, param)


def test_bad_requests_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", temperature=-2)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=CHAT, stream=True, max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens"


def test_routes_methods_and_bodies(base):
    _error(httpx.get(base + "/v1/nothing"), 404, None)
    _error(httpx.get(base + "/v1/completions"), 405, None)
    _error(httpx.post(base + "/v1/completions", content=b"{not json"), 400, None)
    _error(httpx.post(base + "/v1/completions", json=[1, 2]), 400, None)
    _error(httpx.post(base + "/v1/completions", content=b"x" * (2 << 20)), 413, None)

    def chunked():
        for _ in range(40):
            yield b" " * (64 << 10)

    _error(httpx.post(base + "/v1/completions", content=chunked()), 413, None)


def test_tokenize_and_detokenize(base, engine):
    r = httpx.post(base + "/tokenize", json={"prompt": "Hello"}).json()
    assert r["tokens"] == engine.tokenizer.encode("Hello")
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == engine.max_model_len
    chat = httpx.post(base + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == chat_prompt_ids(engine.tokenizer, CHAT)
    back = httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": engine.tokenizer.decode(r["tokens"])}
    _error(httpx.post(base + "/detokenize", json={"tokens": [-1]}), 400, "tokens")
    _error(httpx.post(base + "/tokenize", json={"text": "x"}), 400, "text")


# ---- disconnects and metrics ---------------------------------------------------------------


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_metrics_names(base, client):
    client.completions.create(model=NAME, prompt="Hello", max_tokens=3)
    text = httpx.get(base + "/metrics").text
    for name in (
        "nv:num_requests_running",
        "nv:num_requests_waiting",
        "nv:kv_cache_usage_perc",
        "nv:prompt_tokens_total",
        "nv:generation_tokens_total",
        "nv:prefix_cache_queries_total",
        "nv:prefix_cache_hits_total",
        "nv:time_to_first_token_seconds_bucket",
        "nv:inter_token_latency_seconds_bucket",
        "nv:e2e_request_latency_seconds_bucket",
    ):
        assert name in text, name
    assert _metric(base, "nv:generation_tokens_total") >= 3
    assert _metric(base, "nv:time_to_first_token_seconds_count") >= 1


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_is_aborted(base, engine, stream, caplog):
    body = {
        "model": NAME,
        "prompt": "Hello",
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": stream,
    }
    with httpx.Client(timeout=30) as http:
        if stream:
            with http.stream("POST", base + "/v1/completions", json=body) as r:
                lines = r.iter_lines()  # (kept: a dropped iterator closes the response)
                assert next(lines).startswith("data: ")
                assert _metric(base, "nv:num_requests_running") == 1
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(base + "/v1/completions", json=body, timeout=1.0)
    _wait_for(lambda: _metric(base, "nv:num_requests_running") == 0)
    _wait_for(lambda: engine.stats.num_free_blocks == engine.stats.num_blocks)
    assert "Traceback" not in caplog.text


def test_api_key(engine):
    served = _Served(engine, ServerConfig(NAME, api_key="sekret"))
    try:
        _error(httpx.get(served.base + "/v1/models"), 401, None)
        bad = httpx.get(served.base + "/v1/models", headers={"Authorization": "Bearer nope"})
        _error(bad, 401, None)
        assert httpx.get(served.base + "/health").status_code == 200  # not under /v1
        good = openai.OpenAI(base_url=served.base + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in good.models.list()] == [NAME]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.base + "/v1", api_key="x", max_retries=0).models.list()
    finally:
        served.close()


def test_profiler_routes_exist_only_with_the_directory_set(engine, base, tmp_path, monkeypatch):
    # vLLM's POST /start_profile and /stop_profile: routed only when NV_TORCH_PROFILER_DIR is
    # set; the engine core writes its trace there (and goes on serving)
    monkeypatch.delenv("NV_TORCH_PROFILER_DIR", raising=False)
    plain = _Served(engine, ServerConfig(NAME))
    try:
        assert httpx.post(plain.base + "/start_profile").status_code == 404
    finally:
        plain.close()
    monkeypatch.setenv("NV_TORCH_PROFILER_DIR", str(tmp_path))
    served = _Served(engine, ServerConfig(NAME))
    try:
        assert httpx.post(served.base + "/start_profile").status_code == 200
        c = openai.OpenAI(base_url=served.base + "/v1", api_key="unused", max_retries=0)
        out = c.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
        assert out.choices[0].text is not None
        assert httpx.post(served.base + "/stop_profile").status_code == 200
        _wait_for(lambda: any(tmp_path.glob("nv-rank0-*.json.gz")))
    finally:
        served.close()


def test_a_loop_or_parser_that_fails_to_import_is_not_used(tmp_path, monkeypatch):
    """The server runs on uvloop and httptools where they import; a broken install (found, but
    failing to import) falls back to asyncio or h11 instead of stopping the server."""
    from nv_engine.entrypoints.openai.app import _importable

    (tmp_path / "nv_broken_loop.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _importable("nv_broken_loop", "asyncio") == "asyncio"
    assert _importable("json", "h11") == "json"
