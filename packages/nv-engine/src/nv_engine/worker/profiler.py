"""torch.profiler over a rank's steps, started and stopped on every rank at once
(`LLM.start_profile()` / `stop_profile()`, vLLM's API; traces go to $NV_TORCH_PROFILER_DIR)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile

PROFILER_DIR_ENV = "NV_TORCH_PROFILER_DIR"  # vLLM's VLLM_TORCH_PROFILER_DIR
logger = logging.getLogger(__name__)


class ProfileCommand(NamedTuple):
    """Rank 0's message to the workers, on the plan channel between steps."""

    start: bool  # else stop
    directory: str


class RankProfiler:
    """This rank's profiler: CPU ops, and kernels on CUDA. `stop()` writes a gzipped Chrome
    trace (chrome://tracing, Perfetto) named after the rank into the directory `start()` got.
    The profiler's own cost shows in host times: CUPTI instruments every CUDA-graph node at
    launch (docs/benchmarks.md), so read the kernels' times, not the launches'."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self._profile: profile | None = None
        self._directory: Path | None = None

    @property
    def active(self) -> bool:
        return self._profile is not None

    def apply(self, command: ProfileCommand) -> None:
        if command.start:
            self.start(command.directory)
        else:
            self.stop()

    def start(self, directory: str) -> None:
        if self._profile is not None:
            raise RuntimeError("the profiler is already running (stop_profile() first)")
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._directory = Path(directory)
        self._directory.mkdir(parents=True, exist_ok=True)
        self._profile = profile(activities=activities)
        self._profile.start()

    def stop(self) -> Path:
        if self._profile is None or self._directory is None:
            raise RuntimeError("the profiler is not running (start_profile() first)")
        prof, self._profile = self._profile, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued steps' kernels belong in the trace
        prof.stop()
        name = f"nv-rank{self.rank}-{os.getpid()}-{time.time_ns()}.pt.trace.json.gz"
        path = self._directory / name
        with tempfile.TemporaryDirectory(dir=self._directory) as tmp:
            part = Path(tmp) / name
            prof.export_chrome_trace(str(part))  # gzipped, for the name's .gz
            os.replace(part, path)  # a reader sees the whole trace or none
        logger.info("rank %d's trace: %s", self.rank, path)
        return path
