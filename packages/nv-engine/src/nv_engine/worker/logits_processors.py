"""What some requests do to a step's logits besides sampling them: penalties, tokens banned
before min_tokens, prompt log-probabilities. Each runs only in steps where a row asks for it,
outside the decode CUDA graphs, so the common step pays nothing."""

from __future__ import annotations

import torch
from torch import nn

from nv_engine.core.plan import ScheduledSeq, StepPlan
from nv_engine.core.sequence import PENDING
from nv_kernels import apply_penalties, token_logprobs


def _on_device(data: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.int64).to(device, non_blocking=True)


def penalized(
    logits: torch.Tensor, rows: list[ScheduledSeq], inputs: torch.Tensor | None
) -> torch.Tensor:
    """`apply_penalties` for the rows (one per logits row) that ask. A decode row whose input
    token is still PENDING on the host counts it from `inputs`, the step's input ids on the
    device (decode steps; None in prefill)."""
    r, v = logits.shape
    factors = [[1.0, 0.0, 0.0] for _ in range(r)]
    prompt_at: tuple[list[int], list[int]] = ([], [])  # (row, token) pairs
    output_at: tuple[list[int], list[int]] = ([], [])
    pending = []
    for i, s in enumerate(rows):
        p = s.penalties
        if p is None:
            continue
        factors[i] = [p.repetition, p.frequency, p.presence]
        prompt_at[0].extend([i] * len(p.prompt_ids))
        prompt_at[1].extend(p.prompt_ids)
        output_at[0].extend([i] * len(p.output_ids))
        output_at[1].extend(p.output_ids)
        if inputs is not None and s.token_ids[0] == PENDING:
            pending.append(i)
    dev = logits.device
    in_prompt = torch.zeros(r, v, dtype=torch.bool, device=dev)
    in_prompt[_on_device(prompt_at[0], dev), _on_device(prompt_at[1], dev)] = True
    counts = torch.zeros(r, v, dtype=torch.float32, device=dev)  # [rows, vocab]
    where = (_on_device(output_at[0], dev), _on_device(output_at[1], dev))
    counts.index_put_(where, torch.ones(len(output_at[0]), device=dev), accumulate=True)
    if pending:
        rows_t = _on_device(pending, dev)
        ones = torch.ones(len(pending), device=dev)
        counts.index_put_((rows_t, inputs[rows_t]), ones, accumulate=True)
    f = torch.tensor(factors, dtype=torch.float32).to(dev, non_blocking=True)
    return apply_penalties(logits, in_prompt, counts, f[:, 0], f[:, 1], f[:, 2])


def mask_banned(logits: torch.Tensor, rows: list[ScheduledSeq]) -> torch.Tensor:
    """logits with each row's banned tokens (EOS and stop ids before min_tokens) at -inf: a
    copy, so a CUDA graph's output stays intact."""
    v = logits.shape[-1]
    pairs = [(i, t) for i, s in enumerate(rows) for t in s.banned_token_ids if t < v]
    if not pairs:
        return logits
    index = torch.tensor(pairs, dtype=torch.int64).T.to(logits.device, non_blocking=True)
    ninf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    return logits.index_put(tuple(index), ninf)


def prompt_logprobs(
    model: nn.Module, hidden: torch.Tensor, plan: StepPlan, chunk: int, on_rank0: bool
) -> tuple[torch.Tensor, ...] | None:
    """`token_logprobs` of the prompt targets of the prefill chunks that ask, from the step's
    hidden states `[num_tokens, hidden]`, `chunk` positions at a time. Every rank
    calls it (the LM head gathers across ranks); rank 0 gets the result, the others None."""
    positions: list[int] = []
    targets: list[int] = []
    k, offset = 0, 0
    for s in plan.seqs:
        if s.prompt_logprobs is not None:
            k = max(k, s.prompt_logprobs.k)
            n = len(s.prompt_logprobs.targets)
            positions += range(offset, offset + n)
            targets += s.prompt_logprobs.targets
        offset += len(s.token_ids)
    pos_t, tgt_t = _on_device(positions, hidden.device), _on_device(targets, hidden.device)
    parts = []
    for lo in range(0, len(positions), chunk):
        hi = lo + chunk
        logits = model.compute_logits(hidden, pos_t[lo:hi])
        if on_rank0:
            parts.append(token_logprobs(logits, tgt_t[lo:hi], k))
    if not parts:
        return None
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))
