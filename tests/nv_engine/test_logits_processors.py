"""The per-request logits processors on their own, in the dtypes the GPU gives them."""

from __future__ import annotations

import pytest
import torch

from nv_engine.core.plan import PenaltyInputs, ScheduledSeq
from nv_engine.core.sequence import PENDING
from nv_engine.worker.logits_processors import mask_banned, penalized


def _row(token, banned=(), penalties=None):
    return ScheduledSeq(0, [token], 0, [0], True, banned_token_ids=banned, penalties=penalties)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_banned_keeps_dtype_and_the_input(dtype):
    logits = torch.randn(3, 10).to(dtype)
    before = logits.clone()
    out = mask_banned(logits, [_row(1, (2, 5)), _row(1), _row(1, (0, 99))])  # 99: past vocab
    assert out.dtype == dtype and torch.equal(logits, before)  # a copy
    assert out[0, [2, 5]].isinf().all() and out[2, 0].isinf()
    assert out.isinf().sum() == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalized_counts_a_pending_input_from_the_device(dtype):
    v = 8
    logits = torch.full((2, v), 2.0).to(dtype)
    pen = PenaltyInputs(1.0, 1.0, 0.0, (), (3, 3))
    rows = [_row(PENDING, penalties=pen), _row(5)]  # row 0's input is still being sampled
    inputs = torch.tensor([4, 5])  # ... and is token 4 on the device
    out = penalized(logits, rows, inputs)
    assert out.dtype == torch.float32
    want = torch.full((2, v), 2.0)
    want[0, 3] -= 2  # counted twice in the host's history
    want[0, 4] -= 1  # the pending token
    torch.testing.assert_close(out, want)
    # a prefill step (no inputs): only the host's history counts
    out = penalized(logits, rows, None)
    want[0, 4] = 2.0
    torch.testing.assert_close(out, want)


def test_memory_profile_of_the_logits_processors_runs(tmp_path):
    # on CUDA it runs inside the KV-cache sizing; here it is called directly
    from nv_testing import save_tiny_qwen3

    from nv_engine import LLM

    save_tiny_qwen3(tmp_path)
    with LLM(str(tmp_path), device="cpu", max_num_seqs=4, dtype="bfloat16") as llm:
        llm.model_runner._profile_logits_processors()
