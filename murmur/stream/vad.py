"""Silero VAD run frame by frame, with each stream's recurrent state carried across calls.

One ONNX session serves every stream; a stream owns only its LSTM state, the model's 64-sample
context and the samples short of a 512-sample frame, so memory per idle stream is a few KB.
Speech starts at a frame >= threshold and ends after `min_silence_s` below `neg_threshold`
(Silero's hysteresis), which is what turn detection and the speech_started/stopped events need.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from murmur.audio.vad import FRAME_SAMPLES, SAMPLE_RATE

CONTEXT = 64  # samples of the previous frame the model sees in front of each frame at 16 kHz


@lru_cache(maxsize=1)
def _session():
    from murmur.audio.vad import _session as make
    return make("silero_vad.onnx"), threading.Lock()


@dataclass
class VadEvent:
    kind: str  # "speech_started" | "speech_stopped"
    time: float  # stream seconds: where speech started (padded) or where the silence began
    at: float  # stream seconds of audio judged when the event was known


@dataclass
class StreamingVad:
    threshold: float = 0.5
    neg_threshold: float | None = None
    min_silence_s: float = 0.5  # OpenAI's server_vad default silence_duration_ms
    prefix_padding_s: float = 0.3
    # state
    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros((1, CONTEXT), np.float32))
    rest: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    frames: int = 0  # frames processed
    speaking: bool = False
    silent_frames: int = 0  # consecutive frames below neg_threshold while speaking
    last_speech_end: float = 0.0  # end of the last speech frame seen

    def __post_init__(self):
        if self.neg_threshold is None:
            self.neg_threshold = max(self.threshold - 0.15, 0.01)

    @property
    def time(self) -> float:
        """Stream time up to which frames were judged."""
        return self.frames * FRAME_SAMPLES / SAMPLE_RATE

    def feed(self, audio: np.ndarray) -> list[VadEvent]:
        """Judge every whole frame that `audio` completes; returns the speech events they raise."""
        a = np.concatenate([self.rest, np.asarray(audio, np.float32)]) if self.rest.size else np.asarray(audio, np.float32)
        n = len(a) // FRAME_SAMPLES
        self.rest = a[n * FRAME_SAMPLES:].copy()
        events: list[VadEvent] = []
        if n == 0:
            return events
        sess, lock = _session()
        sr = np.array(SAMPLE_RATE, dtype=np.int64)
        need_silence = max(1, int(round(self.min_silence_s * SAMPLE_RATE / FRAME_SAMPLES)))
        for i in range(n):
            frame = a[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES][None]
            x = np.concatenate([self.context, frame], axis=1)
            with lock:
                out, self.state = sess.run(None, {"input": x, "state": self.state, "sr": sr})
            self.context = x[:, -CONTEXT:]
            p = float(out.reshape(-1)[0])
            self.frames += 1
            t = self.time
            if p >= self.threshold:
                self.silent_frames = 0
                self.last_speech_end = t
                if not self.speaking:
                    self.speaking = True
                    start = max(0.0, t - FRAME_SAMPLES / SAMPLE_RATE - self.prefix_padding_s)
                    events.append(VadEvent("speech_started", start, t))
            elif self.speaking and p < self.neg_threshold:
                self.silent_frames += 1
                if self.silent_frames >= need_silence:
                    self.speaking = False
                    self.silent_frames = 0
                    events.append(VadEvent("speech_stopped", self.last_speech_end, t))
        return events
