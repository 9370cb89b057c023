from __future__ import annotations

import importlib.util

import pytest

from nv_kernels import get_attention_backend


def test_auto_on_cpu_is_torch():
    assert get_attention_backend("auto", "cpu").name == "torch"
    assert get_attention_backend("triton", "cpu").name == "triton"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="attention_backend"):
        get_attention_backend("cudnn", "cpu")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="installed")
def test_missing_flash_attn_is_a_clear_error():
    with pytest.raises(ValueError, match="flash_attn is not installed"):
        get_attention_backend("flash-attn", "cpu")
