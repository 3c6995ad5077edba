"""The decode loop: engine, long-form streams, scheduler, decoding rules, KV cache and policies, encoder hooks."""
