"""Audio decoding (PyAV) and Whisper's log-mel front end.

The front end reproduces openai-whisper's ``log_mel_spectrogram`` exactly, so
models see the features they were trained on.
"""
from __future__ import annotations

import io
import warnings
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from murmur.errors import AudioError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s window

_FLOAT_FORMATS = {"flt", "fltp", "dbl", "dblp"}


# --------------------------------------------------------------------------- decoding

def load_audio(source: str | Path | bytes, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any container PyAV reads into float32 mono at ``sr`` Hz, in [-1, 1].

    Raises AudioError for missing/empty/undecodable input or input with no usable
    samples. A truncated file yields the part that decodes.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "audio data (bytes)"
        if len(source) == 0:
            raise AudioError(f"{name} is empty")
        opener = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise AudioError(f"audio file not found: {name}")
        if not path.is_file():
            raise AudioError(f"not a regular file: {name}")
        if path.stat().st_size == 0:
            raise AudioError(f"audio file is empty: {name}")
        opener = name

    try:
        container = av.open(opener, metadata_errors="ignore")
    except (av.FFmpegError, OSError) as e:  # probing found no known format
        raise AudioError(f"{name} is not a readable audio file ({e.strerror or e})") from e
    with container:
        if not container.streams.audio:
            raise AudioError(f"{name} contains no audio stream")
        chunks, n_nonfinite, n_seen, error = _decode(container, sr)

    if n_seen and n_nonfinite == n_seen:
        raise AudioError(f"{name} contains no finite samples")
    if n_nonfinite:
        warnings.warn(f"{name}: replaced {n_nonfinite} non-finite samples (NaN/inf) by 0",
                      stacklevel=2)
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    if audio.size == 0:
        why = f" (decoding failed: {error})" if error else ""
        raise AudioError(f"{name} has no audio samples{why}")
    # s16 like whisper/ffmpeg: its downmix is normalised (0.5*(L+R)) and stays in range
    return audio.astype(np.float32) / 32768.0


def _decode(container, sr: int):
    """Decode the first audio stream to int16 mono chunks at ``sr``.

    Returns (chunks, non-finite count, source samples seen, last decode error).
    """
    stream = container.streams.audio[0]
    chunks: list[np.ndarray] = []
    n_nonfinite = n_seen = 0
    error = None
    resampler, key = None, None

    def emit(frames):
        for f in frames:
            chunks.append(f.to_ndarray().reshape(-1))

    try:
        for packet in container.demux(stream):  # ends with a flush packet per stream
            try:
                frames = packet.decode()
            except av.FFmpegError as e:  # one corrupt packet: skip it, keep going
                error = e
                continue
            for frame in frames:
                fmt, layout = frame.format.name, frame.layout.name
                if fmt in _FLOAT_FORMATS:  # NaN/inf would turn into garbage in s16
                    data = frame.to_ndarray()
                    bad = ~np.isfinite(data)
                    n_seen += data.size
                    if bad.any():
                        n_nonfinite += int(bad.sum())
                        rate = frame.sample_rate
                        frame = av.AudioFrame.from_ndarray(np.where(bad, 0, data), fmt, layout)
                        frame.sample_rate = rate
                if (fmt, layout, frame.sample_rate) != key:
                    # The resampler is fixed to its first input; a mid-stream change
                    # of format/layout/rate needs a fresh one (flush the old first).
                    if resampler is not None:
                        emit(resampler.resample(None))
                    resampler = av.AudioResampler(format="s16", layout="mono", rate=sr)
                    key = (fmt, layout, frame.sample_rate)
                frame.pts = None  # timestamps unused; gaps in damaged files must not matter
                emit(resampler.resample(frame))
    except av.FFmpegError as e:  # demuxer failed mid-file (truncation): keep the prefix
        error = e
    if resampler is not None:
        emit(resampler.resample(None))  # flush: otherwise the tail is lost
    return chunks, n_nonfinite, n_seen, error


def audio_duration(audio, sr: int = SAMPLE_RATE) -> float:
    """Duration in seconds of a (..., samples) array or tensor."""
    return audio.shape[-1] / sr


# --------------------------------------------------------------------------- features

def pad_or_trim(array, length: int = N_SAMPLES, *, axis: int = -1):
    """Zero-pad or trim ``array`` (numpy or torch) to ``length`` along ``axis``."""
    n = array.shape[axis]
    if torch.is_tensor(array):
        if n > length:
            array = array.narrow(axis, 0, length)
        elif n < length:
            pads = [0, 0] * array.ndim  # F.pad lists (left, right) from the last dim
            pads[2 * ((-axis - 1) % array.ndim) + 1] = length - n
            array = F.pad(array, pads)
        return array
    if n > length:
        array = array.take(np.arange(length), axis=axis)
    elif n < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - n)
        array = np.pad(array, widths)
    return array


def _hz_to_mel(f):
    # Slaney scale: linear below 1 kHz, logarithmic above (librosa, htk=False)
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz,
                    min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=None)
def mel_filters(n_mels: int = 80) -> torch.Tensor:
    """Slaney mel filterbank [n_mels, N_FFT//2+1], float32.

    Same arithmetic as librosa.filters.mel(sr=16000, n_fft=400, n_mels, htk=False,
    norm='slaney') -- including its float32 roundings -- so it equals the bank that
    openai-whisper ships in mel_filters.npz bit for bit. Treat as read-only (cached).
    """
    fftfreqs = np.fft.rfftfreq(n=N_FFT, d=1.0 / SAMPLE_RATE)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    # librosa stores the triangles in float32 first, then scales by the Slaney norm
    weights = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2:] - mel_f[:-2])
    weights = (weights.astype(np.float64) * enorm[:, None]).astype(np.float32)
    return torch.from_numpy(weights)


@lru_cache(maxsize=None)
def _filters_on(device: torch.device, n_mels: int) -> torch.Tensor:
    return mel_filters(n_mels).to(device)


def log_mel_spectrogram(audio, n_mels: int = 80, padding: int = 0, device=None) -> torch.Tensor:
    """Whisper's log-mel spectrogram: [samples] -> [n_mels, frames], or
    [B, samples] -> [B, n_mels, frames] (each item normalised on its own max).

    ``padding`` zero samples are appended first (whisper passes N_SAMPLES).
    """
    if not torch.is_tensor(audio):
        with warnings.catch_warnings():
            # a read-only recording (a view the caller keeps) is fine: nothing here writes to it,
            # and copying a whole recording to silence the warning would cost its size again
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            audio = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    audio = audio.float()
    if device is not None:
        audio = audio.to(device)
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT, device=audio.device)  # periodic by default
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True,
                      pad_mode="reflect", return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2  # whisper drops the last frame
    mel_spec = _filters_on(audio.device, n_mels) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    # 80 dB dynamic range below the loudest bin; per item so batching changes nothing
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0
