from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

_MASK64 = (1 << 64) - 1


def salt_hash(salt: int | str | bytes | None) -> int:
    """The chain's seed: 0 without a salt, else a hash of the salt (so every block hash changes)."""
    if salt is None:
        return 0
    if isinstance(salt, int):
        salt = str(salt)
    if isinstance(salt, str):
        salt = salt.encode()
    if not isinstance(salt, bytes):
        raise TypeError(f"cache_salt must be int, str or bytes, got {type(salt).__name__}")
    return xxhash.xxh64_intdigest(b"salt:" + salt)


def hash_block_tokens(prev_hash: int, token_ids: Sequence[int]) -> int:
    """h_i = xxh64(h_{i-1} || tokens of block i), as an unsigned 64-bit int."""
    h = xxhash.xxh64()
    h.update((prev_hash & _MASK64).to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()
