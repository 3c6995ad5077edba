"""Errors a user can act on. The CLI prints these without a traceback."""


class MurmurError(Exception):
    """Base class for every error Murmur reports to the user."""


class AudioError(MurmurError):
    """The input could not be decoded as audio, or holds no usable samples."""


class ModelError(MurmurError):
    """A model is missing, corrupt or of an unsupported kind."""


class ReferenceError_(MurmurError):
    """A reference or hypothesis file for scoring is malformed."""


class OptionsError(MurmurError, ValueError):
    """A transcription setting is of the wrong kind or out of range (a ValueError too, as a bad
    chunk size always was)."""
