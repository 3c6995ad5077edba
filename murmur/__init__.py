"""Murmur: long-form speech recognition with sequential accuracy at batched speed."""
from .decoding import DecodingOptions
from .errors import AudioError, ModelError, MurmurError
from .loading import load_model
from .transcribe import transcribe
from .types import Segment, Transcript, Turn, Word

__all__ = ["transcribe", "load_model", "DecodingOptions", "Transcript", "Segment", "Word", "Turn",
           "MurmurError", "AudioError", "ModelError"]
__version__ = "0.1.0"
