"""Voice activity detection with the Silero VAD model bundled in ``silero_vad``.

The model runs on CPU through onnxruntime with one intra-op and one inter-op
thread: the per-frame LSTM work is too small to split, and on this model two
intra-op threads measured ~2.5x *slower* than one. Where the installed
``silero_vad`` ships its batched "sequence" ONNX export (one ONNX call per
~16 s block instead of one per 32 ms frame), that is used: same probabilities
bit for bit, ~5x faster. Older versions fall back to the streaming ONNX model.
Audio over 4 min runs as fixed 4-min blocks, each after 30 s of its past, one per core: the other
core sat idle while VAD held up the first window (1.6 -> 1.0 s on 14 min, Xeon, 2 cores).
"""
from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from murmur.threads import torch_threads

SAMPLE_RATE = 16000
FRAME_SAMPLES = 512  # one speech probability per 512 samples (32 ms) at 16 kHz
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
BLOCK_FRAMES = 7500  # 240 s: long audio runs as blocks this long, in parallel
WARM_FRAMES = 938  # 30 s of the past before each block: the LSTM state forgets slowly

__all__ = [
    "FRAME_S",
    "FRAME_SAMPLES",
    "VadOptions",
    "meeting_options",
    "regions_from_probs",
    "speech_probs",
    "speech_regions",
]


@dataclass
class VadOptions:
    """Silero ``get_speech_timestamps`` parameters, in seconds.

    threshold: frames with probability >= threshold start speech.
    neg_threshold: inside speech, frames below it count as silence
        (None: Silero's default, ``max(threshold - 0.15, 0.01)``).
    min_speech_s: shorter speech regions are dropped.
    min_silence_s: silences shorter than this do not end a region.
    speech_pad_s: padding added to each side of a region.
    max_speech_s: Silero splits longer regions (inf: never; the chunker
        does its own splitting at quiet points).
    """

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_s: float = 0.25
    min_silence_s: float = 0.1
    speech_pad_s: float = 0.03
    max_speech_s: float = math.inf

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 < self.neg_threshold <= self.threshold:
            raise ValueError(
                f"neg_threshold must be in (0, threshold={self.threshold}], got {self.neg_threshold}"
            )
        for name in ("min_speech_s", "min_silence_s", "speech_pad_s"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not self.max_speech_s > 0.0:
            raise ValueError(f"max_speech_s must be > 0, got {self.max_speech_s}")


def meeting_options() -> VadOptions:
    """The options the chunker and the diarizer share (they must: the turns are the same at every
    chunk size only if both see the same regions). Silero's defaults (0.5, 30 ms pad) miss quiet,
    distant talkers in meeting audio; on the AMI clips threshold 0.3 with 0.2 s pads cut missed
    speech from 18 % to 7 % at 0.8 % false alarm, and a missed region is words lost for good."""
    return VadOptions(threshold=0.3, speech_pad_s=0.2, min_silence_s=0.3)


# --------------------------------------------------------------------------- model

def _session(filename: str):
    import importlib.resources

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # see module docstring: 2 is slower here
    opts.inter_op_num_threads = 1
    path = importlib.resources.files("silero_vad.data").joinpath(filename)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class _Vad:
    """The loaded model plus Silero's probability -> timestamps state machine."""

    def __init__(self, prefer_sequence: bool = True):
        # ``import silero_vad`` sets torch to 1 thread, which would slow every later Whisper pass
        with torch_threads(), warnings.catch_warnings():
            # its loader uses the deprecated importlib.resources.path
            warnings.simplefilter("ignore", DeprecationWarning)
            import silero_vad
            from silero_vad.utils_vad import get_speech_timestamps_from_probs

            self.to_timestamps = get_speech_timestamps_from_probs
            self.kind, filename = "stream", "silero_vad.onnx"
            if prefer_sequence:
                try:
                    self.model = silero_vad.load_silero_vad(sequence=True)
                    self.kind, filename = "sequence", "silero_vad_16k_sequence.onnx"
                except TypeError:  # silero-vad without the sequence export
                    pass
            if self.kind == "stream":
                self.model = silero_vad.load_silero_vad(onnx=True)
        # Rebuild the session so the thread limits hold whatever the package's defaults.
        self.model.session = _session(filename)
        # The streaming wrapper keeps LSTM state on the object; the sequence one is
        # stateless (state passed per call), so only the fallback needs the lock.
        self._lock = threading.Lock()

    def probs(self, audio: np.ndarray) -> np.ndarray:
        if self.kind == "sequence":
            return self.model.audio_forward(audio, sampling_rate=SAMPLE_RATE)
        import torch

        with self._lock, torch.inference_mode():
            out = self.model.audio_forward(torch.from_numpy(audio), SAMPLE_RATE)
        return out.numpy().reshape(-1).astype(np.float32)


@lru_cache(maxsize=1)
def _vad() -> _Vad:
    return _Vad()


# --------------------------------------------------------------------------- API

def _as_audio(audio, sr: int) -> np.ndarray:
    if sr != SAMPLE_RATE:
        raise ValueError(
            f"VAD needs {SAMPLE_RATE} Hz audio, got sr={sr}; decode with "
            f"murmur.audio.decode.load_audio(path, sr={SAMPLE_RATE})"
        )
    a = np.asarray(audio)
    if a.ndim != 1:
        a = np.squeeze(a)
        if a.ndim > 1:
            raise ValueError(f"VAD needs mono audio, got shape {np.shape(audio)}")
        a = a.reshape(-1)
    if np.issubdtype(a.dtype, np.integer):  # PCM: scale to [-1, 1] as the model expects
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max + 1)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.size and not np.isfinite(a).all():
        raise ValueError("audio contains NaN or infinite samples")
    return a


def speech_probs(audio: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Speech probability per 512-sample (32 ms) frame: float32, ``ceil(len/512)`` values.

    Frame i covers samples ``[512*i, 512*(i+1))``; the last frame is zero-padded.
    """
    a = _as_audio(audio, sr)
    if a.size == 0:
        return np.zeros(0, dtype=np.float32)
    v = _vad()
    if v.kind != "sequence" or a.size <= BLOCK_FRAMES * FRAME_SAMPLES:
        return v.probs(a)
    # long audio: fixed blocks, each after WARM_FRAMES of its past, on up to torch's thread count
    # (the model runs one thread a call); the blocks, so the result, never depend on that count
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def block(f0: int) -> np.ndarray:
        w0 = max(f0 - WARM_FRAMES, 0)
        p = v.probs(a[w0 * FRAME_SAMPLES:(f0 + BLOCK_FRAMES) * FRAME_SAMPLES])
        return p[f0 - w0:]

    starts = range(0, math.ceil(a.size / FRAME_SAMPLES), BLOCK_FRAMES)
    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(starts)))) as ex:
        return np.concatenate(list(ex.map(block, starts)))


def regions_from_probs(
    probs: np.ndarray, n_samples: int, sr: int = SAMPLE_RATE, options: VadOptions | None = None
) -> list[tuple[float, float]]:
    """Speech regions (seconds) from ``speech_probs`` output, without rerunning the model."""
    if sr != SAMPLE_RATE:
        raise ValueError(f"VAD works at {SAMPLE_RATE} Hz, got sr={sr}")
    o = options or VadOptions()
    if n_samples <= 0 or len(probs) == 0:
        return []
    stamps = _vad().to_timestamps(
        [float(p) for p in probs],
        sampling_rate=SAMPLE_RATE,
        threshold=o.threshold,
        neg_threshold=o.neg_threshold,
        min_speech_duration_ms=o.min_speech_s * 1000.0,
        min_silence_duration_ms=o.min_silence_s * 1000.0,
        speech_pad_ms=o.speech_pad_s * 1000.0,
        max_speech_duration_s=o.max_speech_s,
        audio_length_samples=int(n_samples),
    )
    # Samples -> seconds ourselves: return_seconds would round to 0.1 s.
    return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps if s["end"] > s["start"]]


def speech_regions(
    audio: np.ndarray, sr: int = SAMPLE_RATE, options: VadOptions | None = None
) -> list[tuple[float, float]]:
    """Sorted, non-overlapping ``(start, end)`` speech regions in seconds.

    ``audio`` is mono float in [-1, 1] at 16 kHz (integer PCM is scaled).
    Empty or silent audio gives ``[]``. Thread-safe; the model is loaded once.
    """
    a = _as_audio(audio, sr)
    return regions_from_probs(speech_probs(a, sr), a.size, sr, options)
