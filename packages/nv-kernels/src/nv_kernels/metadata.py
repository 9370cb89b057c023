from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class SharedPrefix(NamedTuple):
    """Decode rows that start with the same cache blocks: the rows marked in `rows` (int32
    [num_seqs], 1 or 0) all start with the first `length` (int32 [1], whole blocks, may be 0)
    tokens of `blocks` (int32 [n], at least that many blocks), before their newest token. A
    backend may attend to them once for those rows together and to each row's rest alone; the
    result is the same. Tensors, so that a CUDA graph replays with other values."""

    length: torch.Tensor
    blocks: torch.Tensor
    rows: torch.Tensor


@dataclass(slots=True)
class AttentionMetadata:
    """What every attention layer needs for one forward step, passed in explicitly.

    Token layout is vLLM's: the step's tokens are packed in one tensor, sequence by sequence.
    - `slot_mapping[t]` is the cache slot (block_id * block_size + offset) that token t's K/V is
      written to; a negative slot skips the token (padding).
    - prefill: `cu_seqlens_q` delimits each sequence's new tokens; `cu_seqlens_k` its whole
      context (cached prefix + new tokens). With `block_tables` set, keys are read from the cache
      (prefix hits, earlier chunks); without it, from this step's K/V directly.
    - decode: one query token per sequence; `context_lens[i]` keys are read through
      `block_tables[i]` (rows padded with any valid block id; lengths bound the reads).
      `shared_prefix` (cascade attention, or None): a prefix that some rows share (SharedPrefix).
    """

    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] int64
    context_lens: torch.Tensor | None = None  # [num_seqs] int32
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int32
    cu_seqlens_q: torch.Tensor | None = None  # [num_seqs + 1] int32
    cu_seqlens_k: torch.Tensor | None = None  # [num_seqs + 1] int32
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    shared_prefix: SharedPrefix | None = None
