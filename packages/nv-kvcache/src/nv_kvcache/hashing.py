from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

_MASK128 = (1 << 128) - 1


def salt_hash(salt: int | str | bytes | None) -> int:
    """The chain's seed: 0 without a salt, else a 128-bit hash of the salt (so every block hash
    changes)."""
    if salt is None:
        return 0
    if isinstance(salt, int):
        salt = str(salt)
    if isinstance(salt, str):
        salt = salt.encode()
    if not isinstance(salt, bytes):
        raise TypeError(f"cache_salt must be int, str or bytes, got {type(salt).__name__}")
    return xxhash.xxh3_128_intdigest(b"salt:" + salt)


def hash_block_tokens(prev_hash: int, token_ids: Sequence[int]) -> int:
    """h_i = xxh3_128(h_{i-1} || tokens of block i), as an unsigned 128-bit int.

    128 bits because a hit is served on the chain hash and the block's own tokens alone: with
    64 bits, a birthday search of ~2^32 prefixes finds two different prefixes with one hash, and
    a block after them with equal tokens would be served for the wrong prefix."""
    data = (prev_hash & _MASK128).to_bytes(16, "little") + array("q", token_ids).tobytes()
    return xxhash.xxh3_128_intdigest(data)
