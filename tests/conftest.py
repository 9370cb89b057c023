from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before any kernel
# module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The built-in demo model (tiny random Qwen3, character tokenizer with a chat template),
    built once per test session; tests only read it."""
    from nv_engine.entrypoints.demo import build_demo_model

    path = tmp_path_factory.mktemp("demo")
    build_demo_model(path)
    return path
