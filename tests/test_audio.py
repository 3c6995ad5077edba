"""Decoding and the log-mel front end, on real speech from ../shared/data."""
import struct
from fractions import Fraction
import wave

import av
import numpy as np
import pytest
import torch

from murmur.audio.decode import (
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    audio_duration,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
)
from murmur.errors import AudioError


@pytest.fixture(scope="module")
def jfk(jfk_path):
    return load_audio(jfk_path)


def container_duration(path) -> float:
    """Duration the container declares for its first audio stream (independent of decoding)."""
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        return float(s.duration * s.time_base)


def write_float_wav(path, samples: np.ndarray, sr: int = SAMPLE_RATE):
    """32-bit IEEE-float mono WAV by hand (the stdlib wave module only writes PCM)."""
    data = np.asarray(samples, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sr, sr * 4, 4, 32)  # WAVE_FORMAT_IEEE_FLOAT
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                     + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                     + b"data" + struct.pack("<I", len(data)) + data)


# ------------------------------------------------------------------ log-mel vs references

def reference_log_mel(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Float64 numpy log-mel: reflect-padded frames, periodic hann, rfft, librosa filters."""
    librosa = pytest.importorskip("librosa")
    x = np.pad(audio.astype(np.float64), N_FFT // 2, mode="reflect")
    n_frames = 1 + (len(x) - N_FFT) // HOP_LENGTH
    frames = x[np.arange(N_FFT)[None, :] + HOP_LENGTH * np.arange(n_frames)[:, None]]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)[:-1].T) ** 2  # drop last frame
    fb = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels, dtype=np.float64)
    log_spec = np.log10(np.maximum(fb @ power, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_float64_reference(jfk, n_mels):
    ours = log_mel_spectrogram(jfk, n_mels=n_mels).numpy()
    ref = reference_log_mel(jfk, n_mels)
    assert ours.shape == ref.shape == (n_mels, len(jfk) // HOP_LENGTH)
    err = np.abs(ours - ref).max()
    print(f"max abs error vs float64 reference (n_mels={n_mels}): {err:.3g}")
    assert err < 1e-3


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_openai_whisper(jfk, n_mels):
    whisper_audio = pytest.importorskip("whisper.audio")
    x = torch.from_numpy(jfk)
    for padding in (0, N_SAMPLES):
        ours = log_mel_spectrogram(jfk, n_mels=n_mels, padding=padding)
        ref = whisper_audio.log_mel_spectrogram(x, n_mels=n_mels, padding=padding)
        assert ours.shape == ref.shape
        err = (ours - ref).abs().max().item()
        print(f"max abs error vs openai-whisper (n_mels={n_mels}, padding={padding}): {err:.3g}")
        assert err < 1e-6
    # the hand-built filterbank equals the one whisper ships, bit for bit
    np.testing.assert_array_equal(mel_filters(n_mels).numpy(),
                                  whisper_audio.mel_filters("cpu", n_mels).numpy())


def test_log_mel_padding_batch_and_window(jfk):
    window = pad_or_trim(log_mel_spectrogram(jfk, padding=N_SAMPLES), N_FRAMES)
    assert window.shape == (80, N_FRAMES)
    # tensor input and numpy input agree; a batch equals its items taken one by one
    quiet = (jfk * 0.05).astype(np.float32)
    batch = log_mel_spectrogram(torch.from_numpy(np.stack([jfk, quiet])))
    assert batch.shape == (2, 80, len(jfk) // HOP_LENGTH)
    torch.testing.assert_close(batch[0], log_mel_spectrogram(jfk), rtol=0, atol=1e-6)
    torch.testing.assert_close(batch[1], log_mel_spectrogram(quiet), rtol=0, atol=1e-6)


def test_pad_or_trim_numpy_and_torch():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert pad_or_trim(a, 2).tolist() == [[0, 1], [4, 5], [8, 9]]
    assert pad_or_trim(a, 6)[:, 4:].sum() == 0 and pad_or_trim(a, 6).shape == (3, 6)
    assert pad_or_trim(a, 5, axis=0).shape == (5, 4)
    t = torch.from_numpy(a)
    for length, axis in [(2, -1), (6, -1), (2, 0), (5, 0)]:
        np.testing.assert_array_equal(pad_or_trim(t, length, axis=axis).numpy(),
                                      pad_or_trim(a, length, axis=axis))
    assert pad_or_trim(np.ones(10)).shape == (N_SAMPLES,)


# ------------------------------------------------------------------ decoding real files

@pytest.mark.parametrize("rel", ["jfk/jfk.flac", "sonnets/p001.mp3", "ted/bill_gates-TED.mp3"])
def test_load_real_files(data_dir, rel):
    audio = load_audio(data_dir / rel)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.1
    assert abs(audio_duration(audio) - container_duration(data_dir / rel)) < 0.05


def test_bytes_equal_path(jfk_path, jfk):
    np.testing.assert_array_equal(load_audio(jfk_path.read_bytes()), jfk)
    np.testing.assert_array_equal(load_audio(str(jfk_path)), jfk)


def test_8khz_stereo_wav_becomes_16khz_mono(tmp_path, jfk_path, jfk):
    x8 = load_audio(jfk_path, sr=8000)
    assert abs(audio_duration(x8, 8000) - 11.0) < 0.05
    stereo = np.stack([x8, 0.5 * x8], axis=1)  # channels differ, so the downmix matters
    path = tmp_path / "jfk_8k_stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((stereo * 32767).astype("<i2").tobytes())
    y = load_audio(path)
    assert y.ndim == 1 and abs(audio_duration(y) - 11.0) < 0.05
    n = min(len(y), len(jfk))
    corr = np.corrcoef(y[:n], jfk[:n])[0, 1]
    assert corr > 0.95, corr
    assert np.abs(y).max() == pytest.approx(0.75 * np.abs(jfk).max(), rel=0.1)  # (L+R)/2


@pytest.mark.parametrize("ext,with_video", [(".m4a", False), (".mp4", True)])
def test_aac_in_mp4(tmp_path, jfk, ext, with_video):
    path = tmp_path / f"jfk{ext}"
    with av.open(str(path), "w") as out:
        if with_video:  # the audio is not the first stream: load_audio must find it
            video = out.add_stream("mpeg4", rate=1)
            video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        if with_video:
            for _ in range(3):
                img = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                out.mux(video.encode(img))
            out.mux(video.encode(None))
        pcm = (jfk * 32767).astype(np.int16)
        for start in range(0, len(pcm), 4096):
            frame = av.AudioFrame.from_ndarray(pcm[None, start:start + 4096], format="s16",
                                               layout="mono")
            # timestamps let the muxer write an edit list that hides the AAC priming
            frame.sample_rate, frame.pts = SAMPLE_RATE, start
            frame.time_base = Fraction(1, SAMPLE_RATE)
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    y = load_audio(path)
    assert abs(audio_duration(y) - audio_duration(jfk)) < 0.05
    n = min(len(y), len(jfk))
    assert np.corrcoef(y[:n], jfk[:n])[0, 1] > 0.9


# ------------------------------------------------------------------ bad input

def test_missing_and_empty(tmp_path):
    with pytest.raises(AudioError, match="not found.*nope.wav"):
        load_audio(tmp_path / "nope.wav")
    empty = tmp_path / "empty.mp3"
    empty.touch()
    with pytest.raises(AudioError, match="empty.*empty.mp3"):
        load_audio(empty)
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")


def test_non_audio(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(AudioError, match="junk.wav is not a readable audio file"):
        load_audio(junk)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(b"this is a text file, not audio\n" * 100)


def test_container_without_audio(tmp_path):
    path = tmp_path / "video_only.mp4"
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=1)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        out.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8),
                                                        format="rgb24")))
        out.mux(video.encode(None))
    with pytest.raises(AudioError, match="video_only.mp4 contains no audio stream"):
        load_audio(path)


@pytest.mark.parametrize("rel", ["sonnets/p001.mp3", "jfk/jfk.flac"])
def test_truncated_file_decodes_prefix(tmp_path, data_dir, rel):
    full = load_audio(data_dir / rel)
    data = (data_dir / rel).read_bytes()
    cut = tmp_path / ("cut" + (data_dir / rel).suffix)
    cut.write_bytes(data[: int(0.3 * len(data))])
    part = load_audio(cut)
    assert 0.25 < len(part) / len(full) < 0.35
    n = len(part) - 16000  # the decoded prefix is the start of the full recording
    np.testing.assert_allclose(part[:n], full[:n], atol=1e-3)
    with pytest.raises(AudioError):  # too little left to decode anything
        load_audio(data[:64])


def test_non_finite_samples(tmp_path, jfk):
    nan_wav = tmp_path / "nan.wav"
    write_float_wav(nan_wav, np.full(16000, np.nan, np.float32))
    with pytest.raises(AudioError, match="nan.wav contains no finite samples"):
        load_audio(nan_wav)

    some = jfk.copy()
    some[1000:1100] = np.nan
    some[5000] = np.inf
    path = tmp_path / "some_nan.wav"
    write_float_wav(path, some)
    with pytest.warns(UserWarning, match="101 non-finite"):
        y = load_audio(path)
    assert np.isfinite(y).all() and len(y) == len(jfk)
    assert np.abs(y[1000:1100]).max() == 0
    np.testing.assert_allclose(y[:900], jfk[:900], atol=1e-4)


def test_zero_length_stream(tmp_path):
    path = tmp_path / "zero.wav"
    with wave.open(str(path), "wb") as w:  # a valid header with no frames
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    with pytest.raises(AudioError, match="zero.wav has no audio samples"):
        load_audio(path)
