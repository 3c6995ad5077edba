"""Decoder KV cache and the policies that evict from it."""
from murmur.kv.cache import KVCache, Step

__all__ = ["KVCache", "Step"]
