"""Decoder KV cache and the policies that evict from it."""
from .cache import KVCache, Step

__all__ = ["KVCache", "Step"]
