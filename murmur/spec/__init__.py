"""Speculative decoding: draft sources (recycle, mtp, draft:MODEL) whose tokens the engine verifies in one forward."""
