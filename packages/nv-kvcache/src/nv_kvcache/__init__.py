"""Paged KV-cache block manager with hash-based prefix caching."""

from nv_kvcache.block import Block
from nv_kvcache.block_manager import BlockManager, CacheStats
from nv_kvcache.free_queue import FreeBlockQueue
from nv_kvcache.hashing import hash_block_tokens

__all__ = ["Block", "BlockManager", "CacheStats", "FreeBlockQueue", "hash_block_tokens"]
