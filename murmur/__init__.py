"""Murmur: long-form speech recognition with sequential accuracy at batched speed."""
import os

# Before torch loads GNU OpenMP: its threads spin ~300k times at every barrier before they sleep,
# so with another process busy on one of 2 cores each op waits for a descheduled thread. 10k spins:
# stitched set 82 -> 21 s with one core taken, 7.9-8.0 -> 8.1-8.3 s when idle. A user's value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# MKL's reproducible mode on AMD, before MKL loads: without it, on an AVX512-BF16 EPYC a served
# request's timestamp token differed from `murmur transcribe` of the same file (tests/test_serve.py,
# 3 of 3 runs; 0 of 4 with it; 5-9 % of the wall). Not on Intel: on a Xeon with AMX the served text
# matched without it (3 of 3), and its STRICT sgemm made fp32 attention depend on the key count
# (tests/test_kernels.py). A user's value wins.
def _vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


if _vendor() == "AuthenticAMD":
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# the public API, nothing else: every other name is imported by its full path (murmur.audio.vad, ...)
from murmur.engine.decoding import DecodingOptions  # noqa: E402
from murmur.errors import AudioError, ModelError, MurmurError, OptionsError
from murmur.models.loading import load_model
from murmur.options import TranscribeOptions
from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
from murmur.transcribe import transcribe
from murmur.types import Segment, Transcript, Turn, Word

__all__ = ["transcribe", "load_model", "TranscribeOptions", "DecodingOptions", "Transcript", "Segment", "Word",
           "Turn", "MurmurError", "AudioError", "ModelError", "OptionsError", "StreamingTranscriber", "StreamOptions"]
__version__ = "0.1.0"
