"""What some requests do to a step's logits before sampling: penalties, logit bias, allowed
tokens, banned tokens (min_tokens, bad words); and prompt log-probabilities. Each logits
processor says whether a step's rows ask for it and runs only then, outside the decode CUDA
graphs, so the common step pays nothing. A new one is a class here and a field in
SamplingParams."""

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
    """logits with each row's banned tokens (EOS and stop ids before min_tokens, bad words) at
    -inf: a copy, so a CUDA graph's output stays intact."""
    v = logits.shape[-1]
    pairs = [(i, t) for i, s in enumerate(rows) for t in s.banned_token_ids if t < v]
    if not pairs:
        return logits
    index = torch.tensor(pairs, dtype=torch.int64).T.to(logits.device, non_blocking=True)
    ninf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    return logits.index_put(tuple(index), ninf)


def biased(logits: torch.Tensor, rows: list[ScheduledSeq]) -> torch.Tensor:
    """logits plus each row's logit_bias (a copy)."""
    pairs = [(i, t, b) for i, s in enumerate(rows) if s.params for t, b in _bias(s).items()]
    rows_t = _on_device([p[0] for p in pairs], logits.device)
    tokens = _on_device([p[1] for p in pairs], logits.device)
    bias = torch.tensor([p[2] for p in pairs], dtype=logits.dtype).to(logits.device)
    return logits.index_put((rows_t, tokens), bias, accumulate=True)


def _bias(row: ScheduledSeq) -> dict[int, float]:
    return row.params.logit_bias or {}


def allowed_only(logits: torch.Tensor, rows: list[ScheduledSeq]) -> torch.Tensor:
    """logits with every token outside a row's allowed_token_ids at -inf (a copy)."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    for i, s in enumerate(rows):
        if s.params is not None and s.params.allowed_token_ids:
            keep[i] = False
            keep[i, _on_device(list(s.params.allowed_token_ids), logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def conditionally_banned(
    logits: torch.Tensor, rows: list[ScheduledSeq], inputs: torch.Tensor | None
) -> torch.Tensor:
    """A bad word's last token at -inf where the row's input token, sampled last step and known
    only on the device (`inputs`, the step's input ids), completes the rest of the word."""
    if inputs is None:
        return logits
    pairs = [(i, need, ban) for i, s in enumerate(rows) for need, ban in s.conditional_bans]
    rows_t = _on_device([p[0] for p in pairs], logits.device)
    need = _on_device([p[1] for p in pairs], logits.device)
    ban = _on_device([p[2] for p in pairs], logits.device)
    hit = inputs[rows_t] == need  # [pairs]
    current = logits[rows_t, ban]
    ninf = torch.full_like(current, float("-inf"))
    return logits.index_put((rows_t, ban), torch.where(hit, ninf, current))


class LogitsProcessor:
    """One kind of per-request logits work: `applies(rows)` says whether any row of the step
    asks; `__call__` returns the new logits (a copy: a CUDA graph's output stays intact).
    `inputs` are the step's input ids on the device in decode steps (None in prefill)."""

    def applies(self, rows: list[ScheduledSeq]) -> bool:
        raise NotImplementedError

    def __call__(
        self, logits: torch.Tensor, rows: list[ScheduledSeq], inputs: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError


class Penalties(LogitsProcessor):
    def applies(self, rows):
        return any(s.penalties is not None for s in rows)

    def __call__(self, logits, rows, inputs):
        return penalized(logits, rows, inputs)


class LogitBias(LogitsProcessor):
    def applies(self, rows):
        return any(s.params is not None and s.params.logit_bias for s in rows)

    def __call__(self, logits, rows, inputs):
        return biased(logits, rows)


class AllowedTokens(LogitsProcessor):
    def applies(self, rows):
        return any(s.params is not None and s.params.allowed_token_ids for s in rows)

    def __call__(self, logits, rows, inputs):
        return allowed_only(logits, rows)


class BannedTokens(LogitsProcessor):
    """min_tokens' EOS and stop ids, and bad words known to be complete but for one token."""

    def applies(self, rows):
        return any(s.banned_token_ids for s in rows)

    def __call__(self, logits, rows, inputs):
        return mask_banned(logits, rows)


class ConditionalBans(LogitsProcessor):
    def applies(self, rows):
        return any(s.conditional_bans for s in rows)

    def __call__(self, logits, rows, inputs):
        return conditionally_banned(logits, rows, inputs)


# in vLLM's order: penalties, then bias, then masks
LOGITS_PROCESSORS: tuple[LogitsProcessor, ...] = (
    Penalties(),
    LogitBias(),
    AllowedTokens(),
    BannedTokens(),
    ConditionalBans(),
)


def process_logits(
    logits: torch.Tensor, rows: list[ScheduledSeq], inputs: torch.Tensor | None
) -> torch.Tensor:
    """Every logits processor that a row of the step asks for, in order."""
    for processor in LOGITS_PROCESSORS:
        if processor.applies(rows):
            logits = processor(logits, rows, inputs)
    return logits


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
