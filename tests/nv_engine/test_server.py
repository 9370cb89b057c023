"""The OpenAI-compatible server over HTTP on a free port, against the Python API's results."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from nv_engine import LLM, SamplingParams
from nv_engine.demo import build_demo_model
from nv_engine.server import EngineLoop, OpenAIServer

CHAT = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo")
    build_demo_model(path)
    llm = LLM(str(path), device="cpu", kvcache_block_size=16)
    greedy = SamplingParams(temperature=0, max_tokens=8)
    # what the Python API gives, before the loop thread owns the engine
    expected = {
        "completion": llm.generate(["Hello"], greedy, use_tqdm=False)[0],
        "chat": llm.chat(CHAT, greedy, use_tqdm=False)[0],
        "seeded": llm.generate(
            ["Hello"], SamplingParams(temperature=1.0, max_tokens=6, seed=3, n=2), use_tqdm=False
        )[0],
    }
    loop = EngineLoop(llm)
    loop.start()
    server = OpenAIServer(("127.0.0.1", 0), loop, "demo")  # port 0: a free one
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", expected, llm
    server.shutdown()
    server.server_close()
    loop.stop()
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every request's blocks came back
    llm.close()


def _call(base: str, path: str, body: dict | None = None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method="GET" if data is None else "POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(served):
    base, _, _ = served
    assert _call(base, "/health") == (200, {"status": "ok"})
    status, body = _call(base, "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "demo"


def test_completions_match_the_python_api(served):
    base, expected, _ = served
    want = expected["completion"]
    results = [None] * 4

    def call(i):  # concurrent clients: batched by the one engine
        results[i] = _call(
            base,
            "/v1/completions",
            {"model": "demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0},
        )

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for status, body in results:
        assert status == 200 and body["object"] == "text_completion"
        (choice,) = body["choices"]
        assert choice["text"] == want["text"] and choice["finish_reason"] == want["finish_reason"]
        assert body["usage"]["prompt_tokens"] == len(want["prompt_token_ids"])
        assert body["usage"]["completion_tokens"] == len(want["token_ids"])
    # several prompts (text and ids) and n: choices prompt-major, the i-th seeded with seed + i
    seeded = expected["seeded"]["outputs"]
    body = {"prompt": ["Hello", want["prompt_token_ids"]], "max_tokens": 6, "seed": 3, "n": 2}
    status, out = _call(base, "/v1/completions", {**body, "temperature": 1.0})
    assert status == 200 and len(out["choices"]) == 4
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == [o["text"] for o in seeded] * 2


def test_chat_completions_match_the_python_api(served):
    base, expected, _ = served
    status, body = _call(
        base,
        "/v1/chat/completions",
        {"messages": CHAT, "max_completion_tokens": 8, "temperature": 0},
    )
    assert status == 200 and body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": expected["chat"]["text"]}
    assert body["usage"]["prompt_tokens"] == len(expected["chat"]["prompt_token_ids"])


@pytest.mark.parametrize(
    "path,body,status,words",
    [
        ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "a", "stream": True}, 400, "stream"),
        ("/v1/completions", {"prompt": "a", "logprobs": 2}, 400, "logprobs"),
        ("/v1/completions", {"prompt": [], "max_tokens": 2}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x" * 5000}, 400, "max_model_len"),
        ("/v1/completions", {"prompt": [999999]}, 400, "token id"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "role"),
        ("/v1/embeddings", {"input": "a"}, 404, "no route"),
    ],
)
def test_bad_requests_are_400s_and_the_server_goes_on(served, path, body, status, words):
    base, _, _ = served
    got, out = _call(base, path, body)
    assert got == status and words in out["error"]["message"]
    ok, _ = _call(base, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert ok == 200


def test_malformed_json_is_a_400(served):
    base, _, _ = served
    status, out = _call(base, "/v1/completions", raw=b"{not json")
    assert status == 400 and out["error"]["type"] == "invalid_request_error"


def test_serve_command(tmp_path):
    import signal
    import subprocess
    import sys

    build_demo_model(tmp_path)
    cmd = [sys.executable, "-m", "nv_engine.cli", "serve", "--model", str(tmp_path)]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--device", "cpu", "--served-model-name", "x"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:  # the chosen port is printed once the server listens
            if line.startswith("[nv] serving"):
                base = line.split(" at ")[1].strip().removesuffix("/v1")
                break
        else:
            pytest.fail(f"no serving line; exit code {proc.wait()}")
        status, body = _call(base, "/v1/models")
        assert status == 200 and body["data"][0]["id"] == "x"
        status, body = _call(base, "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_a_failed_step_fails_waiting_and_later_requests(tmp_path):
    from nv_testing import save_tiny_qwen3

    save_tiny_qwen3(tmp_path)
    with LLM(str(tmp_path), device="cpu") as llm:

        def broken_step():
            raise RuntimeError("device lost")

        llm.step = broken_step
        loop = EngineLoop(llm)
        loop.start()
        first = loop.submit(lambda e: [e.add_request([5, 6], SamplingParams(max_tokens=2))])
        with pytest.raises(RuntimeError, match="device lost"):
            first.result(timeout=60)
        later = loop.submit(lambda e: [])
        with pytest.raises(RuntimeError, match="device lost"):
            later.result(timeout=60)  # answered, not left hanging
        loop.stop()
