"""`nv-engine serve` as a process, as an operator runs it: the printed address, SIGTERM, a
killed tensor-parallel worker, and input errors on the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(demo_model_dir):
    return demo_model_dir


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nv_engine", *args]


class _Serve:
    """`nv-engine serve --port 0` in its own process group; reads the address it prints."""

    def __init__(self, model_dir: Path, *args: str) -> None:
        argv = _cli(
            "serve", "--model", str(model_dir), "--port", "0", "--device", "cpu",
            "--kvcache-block-size", "16", "--num-kvcache-blocks", "128", *args,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.log: list[str] = []
        deadline = time.monotonic() + 120
        while True:
            line = self.proc.stdout.readline()
            assert line or self.proc.poll() is None, "".join(self.log)
            self.log.append(line)
            found = re.search(r"serving .* at (http://[\d.]+:\d+)/v1", line)
            if found:
                self.base = found.group(1)
                break
            assert time.monotonic() < deadline, "".join(self.log)
        deadline = time.monotonic() + 30
        while True:  # the engine is up before the address is printed; uvicorn just after
            try:
                if httpx.get(self.base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def tp_workers(self) -> list[int]:
        """The tensor-parallel workers: processes the engine core process spawned."""
        (core,) = _spawned(self.proc.pid)
        return _spawned(core)

    def wait(self, timeout: float = 60) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        return "".join(self.log) + out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _spawned(pid: int) -> list[int]:
    """Child processes of `pid` started by multiprocessing's spawn (not its resource tracker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(p) for p in path.read_text().split()] if path.exists() else []
    return [
        c
        for c in children
        if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
        and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()
    ]


def test_sigterm_ends_in_flight_streams_and_exits_zero(model_dir):
    served = _Serve(model_dir)
    try:
        # on uvloop and httptools, nv-engine's dependencies (streaming latency)
        assert served.log[-1].rstrip().endswith("/v1 (uvloop, httptools)"), served.log[-1]
        client = openai.OpenAI(base_url=served.base + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model=str(model_dir), prompt="Hello", max_tokens=4)
        assert r.usage.completion_tokens >= 1
        (core,) = _spawned(served.proc.pid)
        body = {"prompt": "Hi", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", served.base + "/v1/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")  # streaming when the signal comes
            served.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] == "abort"
        log = served.wait()
        assert served.proc.returncode == 0, log
        assert "Traceback" not in log
        assert not Path(f"/proc/{core}").exists()  # the engine core process is gone too
    finally:
        served.kill()


def test_a_killed_worker_kills_the_engine_and_the_server_exits(model_dir):
    served = _Serve(model_dir, "-tp", "2", "--served-model-name", "m")
    try:
        workers = served.tp_workers()
        assert workers, "no tensor-parallel worker process"
        client = openai.OpenAI(base_url=served.base + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model="m", prompt="Hi", max_tokens=3).choices
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(served.base + "/health").status_code != 503:
            assert time.monotonic() < deadline, "health stayed 200 after the worker died"
            time.sleep(0.1)
        r = httpx.post(served.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503
        assert "worker" in r.json()["error"]["message"]
        log = served.wait()
        assert served.proc.returncode not in (0, None)
        assert "tensor-parallel worker rank 1" in log
    finally:
        served.kill()


@pytest.mark.parametrize(
    "args,field",
    [
        (["serve", "--max-num-seqs", "0"], "max_num_seqs"),
        (["generate", "--prompt", "x", "--dtype", "float64"], "dtype"),
        (["serve", "--model", "/no/such/dir"], "model"),
        (["bench", "--gpu-memory-utilization", "2"], "gpu_memory_utilization"),
    ],
)
def test_cli_input_errors_are_one_line(args, field, tmp_path):
    env = {**os.environ, "NV_CACHE_DIR": str(tmp_path)}
    r = subprocess.run(_cli(*args, "--device", "cpu"), capture_output=True, text=True, env=env)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if not line.startswith("[nv]")]
    assert len(lines) == 1 and field in lines[0], r.stderr


def test_help_shows_defaults():
    r = subprocess.run(_cli("serve", "--help"), capture_output=True, text=True)
    assert r.returncode == 0
    assert "(default: 8000)" in r.stdout and "(default: 127.0.0.1)" in r.stdout
    assert "--api-key" in r.stdout and "--served-model-name" in r.stdout


def test_the_installed_command_runs():
    """The `nv-engine` console script (the pyproject's entry point) runs, as users call it."""
    script = Path(sys.executable).parent / "nv-engine"
    assert script.exists(), "nv-engine is not installed beside this Python"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "serve" in r.stdout and "generate" in r.stdout, r.stderr
