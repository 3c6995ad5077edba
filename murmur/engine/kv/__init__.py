"""Decoder KV cache (cache.py) and the policies that evict from it (policies.py)."""
